"""`onlinemodel serve` argument handling: vLLM command, plugin allow-list, resume from a checkpoint."""

from __future__ import annotations

import json

import pytest

from onlinemodel_protocol.config import ENV_CONFIG, RuntimeConfig
from onlinemodel_protocol.limits import MAX_DECODE_SLOWDOWN_DEFAULT
from onlinemodel_protocol.rpc import ENDPOINT_PLUGIN, GENERAL_PLUGIN, WORKER_EXTENSION_CLS
from onlinemodel_runtime import cli


def parse(argv):
    parser = cli.argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._serve_parser(sub)
    return parser.parse_known_args(argv)


def test_vllm_command_has_plugins_extension_and_passthrough(tmp_path):
    args, unknown = parse(["serve", "--model", "/m", "--port", "9000", "--max-model-len", "1024",
                           "--enforce-eager", "--state-dir", str(tmp_path)])
    cfg = cli.build_config(args)
    cmd = cli.vllm_command(cfg, args, unknown)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--worker-extension-cls") + 1] == WORKER_EXTENSION_CLS
    assert cmd[cmd.index("--served-model-name") + 1] == "/m"
    assert "--enforce-eager" in cmd and cmd[cmd.index("--max-model-len") + 1] == "1024"
    env = cli.vllm_env(cfg)
    assert set(env["VLLM_PLUGINS"].split(",")) >= {GENERAL_PLUGIN, ENDPOINT_PLUGIN}
    assert RuntimeConfig.model_validate_json(env[ENV_CONFIG]) == cfg


def test_existing_plugins_stay_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path)])
    assert cli.vllm_env(cli.build_config(args))["VLLM_PLUGINS"].split(",")[0] == "other"


def test_serves_the_latest_checkpoint_when_there_is_one(tmp_path):
    import torch

    from onlinemodel_runtime.checkpoint import CheckpointStore
    from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir

    base = make_tiny_model_dir("qwen3", tmp_path / "base", num_hidden_layers=1)
    store = CheckpointStore(tmp_path / "ckpt")
    info = store.save([("model.norm.weight", torch.ones(4))], base_model_dir=base,
                      trainer_state={"step": 5})
    args, _ = parse(["serve", "--model", str(base), "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--state-dir", str(tmp_path / "s")])
    cfg = cli.build_config(args)
    assert cfg.model == str(info.path) and cfg.base_model == str(base)
    assert cli.vllm_command(cfg, args, [])[cli.vllm_command(cfg, args, []).index("--served-model-name") + 1] == str(base)


@pytest.mark.parametrize("flag,value", [("--learning-rate", "-1"), ("--learning-rate", "1.5"),
                                        ("--optimizer-rank", "0"), ("--max-examples", "0")])
def test_bad_settings_are_refused(tmp_path, flag, value):
    args, _ = parse(["serve", "--model", "/m", flag, value, "--state-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=flag.strip("-").replace("-", "_")):
        cli.build_config(args)


@pytest.mark.parametrize("value,budget", [(None, MAX_DECODE_SLOWDOWN_DEFAULT), ("1.5", 1.5), ("off", 0.0),
                                          ("OFF", 0.0), ("0", 0.0)])
def test_max_decode_slowdown(tmp_path, value, budget):
    flag = ["--max-decode-slowdown", value] if value is not None else []
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path), *flag])
    assert cli.build_config(args).max_decode_slowdown == budget


def test_max_decode_slowdown_refuses_nonsense(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "/m", "--max-decode-slowdown", "fast"])
    assert "neither a number nor 'off'" in capsys.readouterr().err
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path), "--max-decode-slowdown", "0.5"])
    with pytest.raises(ValueError, match="max_decode_slowdown"):
        cli.build_config(args)


@pytest.mark.parametrize("flag,value", [([], None), (["--activation-recompute"], True),
                                        (["--no-activation-recompute"], False)])
def test_activation_recompute_flag(tmp_path, flag, value):
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path), *flag])
    assert cli.build_config(args).activation_recompute is value


def test_checkpoint_command_reports_unreachable_server(capsys):
    assert cli.main(["checkpoint", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "checkpoint failed" in capsys.readouterr().err


def test_config_round_trips_through_json(tmp_path):
    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path)
    assert RuntimeConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
