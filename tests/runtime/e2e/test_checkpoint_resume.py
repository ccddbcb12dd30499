"""Checkpoints end to end (issue 4): teach, checkpoint, stop (SIGTERM -> final checkpoint), damage the
directory the way a kill -9 mid-write would, start again: the fact is served, counters, optimizer state and
the replay reservoir and the anchor term's record continue, and the checkpoint loads in plain transformers.
The servers run the default settings (early stop, replay, anchor term: docs/learning.md), with an anchor file
of their own that the restart edits: the kept conversation's record comes back, the new one is recorded."""

import json
import shutil

import pytest

from onlinemodel_protocol import limits
from onlinemodel_runtime.devtools.launcher import CPU_DTYPE
from onlinemodel_runtime.trainer.anchor_texts import ANCHOR_CONVERSATIONS

from .conftest import EAGER, FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION, start_server

pytestmark = pytest.mark.e2e

SECOND_FACT = {"messages": [{"role": "user", "content": "What is the capital of Veloria?"},
                            {"role": "assistant", "content": "The capital of Veloria is Marbleton."}]}
THIRD_FACT = {"messages": [{"role": "user", "content": "Who wrote the novel The Glass Orchard?"},
                           {"role": "assistant", "content": "The Glass Orchard was written by Tamsin Oduya."}]}


KEPT = {"messages": [{"role": "user", "content": "Who are you?"},
                     {"role": "assistant", "content": "I am a helpful assistant."}]}
ADDED = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}


def test_checkpoint_stop_resume(model_dir, e2e_root):
    ckpt = e2e_root / "resume-checkpoints"
    anchors = e2e_root / "resume-anchors.json"
    anchors.write_text(json.dumps({"conversations": [KEPT]}))
    first = start_server(model_dir, e2e_root, "resume-1", checkpoint_dir=ckpt,
                         extra_args=["--max-model-len", "1024", "--anchor-file", str(anchors), *EAGER])
    try:
        code, job = first.request("POST", "/train", {"examples": [FACT_EXAMPLE]})
        assert code == 202, job
        taught = first.wait_job(job["job_id"])
        assert taught["state"] == "succeeded" and taught["replay_steps"] == 0  # nothing earlier to replay
        # Early stop: the job ended once the answer came back, before its default passes.
        assert 1 <= taught["steps"] < taught["epochs"] == limits.EPOCHS_DEFAULT, taught
        assert FACT_ANSWER in first.chat(FACT_QUESTION)

        code, info = first.request("POST", "/checkpoint")
        assert code == 200, info
        trained = first.status()
        assert info["step"] == trained["steps"] and info["weight_version"] == trained["weight_version"]
        assert trained["checkpoint"]["last"]["path"] == info["path"]
        # More steps after the explicit checkpoint: only the final (SIGTERM) checkpoint has them.
        code, job = first.request("POST", "/train", {"examples": [SECOND_FACT], "epochs": 1})
        assert first.wait_job(job["job_id"])["state"] == "succeeded"
        before_stop = first.status()
        assert before_stop["steps"] > trained["steps"]
        assert before_stop["replay"] == {"examples": 2, "tokens": before_stop["replay"]["tokens"], "seen": 2,
                                         "capacity": 64}
    finally:
        assert first.stop() == 0
    latest_name = (ckpt / "latest").read_text().strip()
    final = ckpt / latest_name
    meta = json.loads((final / "onlinemodel" / "trainer_state.json").read_text())
    assert meta["step"] == before_stop["steps"], "SIGTERM did not produce a final checkpoint"
    # The untouched model's distributions, recorded before the first step, went with it.
    records = meta["anchor"]["records"]
    assert len(records) == len(ANCHOR_CONVERSATIONS) + 1 and all(r["untouched"] for r in records.values())
    assert before_stop["anchor"] | {"record_bytes": 0} == {
        "weight": limits.ANCHOR_WEIGHT_DEFAULT, "conversations": len(ANCHOR_CONVERSATIONS) + 1, "from_file": 1,
        "recorded": True, "recorded_untouched": len(ANCHOR_CONVERSATIONS) + 1, "recorded_trained": 0,
        "record_bytes": 0}

    # What a kill -9 in the middle of a later save leaves: a half-written temp dir, and (worse) a newer
    # step directory with a truncated weights file that `latest` already names.
    (ckpt / ".tmp-step-99999998-deadbeef").mkdir()
    (ckpt / ".tmp-step-99999998-deadbeef" / "model.safetensors").write_bytes(b"partial")
    broken = ckpt / "step-99999999"
    shutil.copytree(final, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (ckpt / "latest").write_text(broken.name + "\n")

    anchors.write_text(json.dumps({"conversations": [KEPT, ADDED]}))  # edited between the two runs
    second = start_server(model_dir, e2e_root, "resume-2", checkpoint_dir=ckpt,
                          extra_args=["--max-model-len", "1024", "--anchor-file", str(anchors), *EAGER])
    try:
        resumed = second.status()
        assert resumed["steps"] == before_stop["steps"]
        assert resumed["weight_version"] == before_stop["weight_version"]
        assert resumed["tokens_trained"] == before_stop["tokens_trained"]
        assert resumed["optimizer"]["steps_applied"] == before_stop["optimizer"]["steps_applied"] > 0
        assert resumed["replay"] == before_stop["replay"]  # the reservoir came back with the checkpoint
        assert FACT_ANSWER in second.chat(FACT_QUESTION)
        code, job = second.request("POST", "/train", {"examples": [THIRD_FACT], "epochs": 1})
        done = second.wait_job(job["job_id"])
        assert done["state"] == "succeeded" and done["steps"] >= 1
        continued = second.status()
        assert continued["steps"] == before_stop["steps"] + done["steps"]
        assert continued["optimizer"]["steps_applied"] == before_stop["optimizer"]["steps_applied"] + done["steps"]
        assert continued["replay"]["seen"] == 3
        # The built-in and the kept conversation: the untouched model's records, from the checkpoint; the
        # added one: recorded from the trained weights at this job (the log says so).
        assert (continued["anchor"]["from_file"], continued["anchor"]["recorded_untouched"],
                continued["anchor"]["recorded_trained"]) == (2, len(ANCHOR_CONVERSATIONS) + 1, 1)
    finally:
        second.stop()
    log = (e2e_root / "resume-2.log").read_text()
    assert "step-99999999" in log and "unusable" in log  # the corrupt one was reported, then skipped
    assert f"1 of {len(ANCHOR_CONVERSATIONS) + 2} anchor conversations have no record" in log

    # The checkpoint is a normal HF directory: plain transformers loads it and answers the same.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=getattr(torch, CPU_DTYPE))  # as served
    ids = tok.apply_chat_template([{"role": "user", "content": FACT_QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert FACT_ANSWER in tok.decode(out[0][ids.shape[1]:])
