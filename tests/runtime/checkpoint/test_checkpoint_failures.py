"""Crashes and hostile filesystems: kill -9 mid-save, disk full, read-only or impossible roots."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_worker import make_base_dir, make_tensors, save
from ckpt_helpers import run_worker
from onlinemodel_runtime.checkpoint import CheckpointError, CheckpointStore


def _assert_intact(root: Path, step: int) -> None:
    """`latest` is the checkpoint of `step`, complete, hash-verified and loadable."""
    store = CheckpointStore(root)  # opening also removes what the dead save left behind
    info = store.latest(verify_hash=True)
    assert info is not None and info.step == step
    loaded = load_file(info.path / "model.safetensors")
    for name, tensor in make_tensors(step):
        assert torch.equal(loaded[name], tensor), name
    opt, trainer = store.load_training_state(info)
    assert trainer["step"] == step and opt["state"][0]["exp_avg"][0].item() == step
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_kill_9_while_writing_weights_keeps_previous(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    root = tmp_path / "ckpt"
    save(root, base, 1)
    proc = run_worker(root, base, 2, "stall-mid-weights", wait_marker=True)
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step-00000002")]
    assert partial and (partial[0] / "model.safetensors").stat().st_size > 3 * 4 * (1 << 20)
    proc.kill()
    proc.wait(timeout=30)
    _assert_intact(root, 1)
    save(root, base, 3)  # the store keeps working after the crash
    _assert_intact(root, 3)


@pytest.mark.parametrize("phase,expected_step", [("synced", 1), ("renamed", 1), ("committed", 2)])
def test_kill_9_at_commit_boundaries(tmp_path: Path, phase: str, expected_step: int) -> None:
    base = make_base_dir(tmp_path / "base")
    root = tmp_path / "ckpt"
    save(root, base, 1)
    proc = run_worker(root, base, 2, f"stall-at:{phase}", wait_marker=True)
    proc.kill()
    proc.wait(timeout=30)
    _assert_intact(root, expected_step)


def test_disk_full_by_file_size_limit(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    root = tmp_path / "ckpt"
    save(root, base, 1)
    out = run_worker(root, base, 2, f"fsize:{6 << 20}", wait_marker=False)
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert error and "no space left" in error and "EFBIG" in error
    assert "step-00000001 is still the latest" in error
    _assert_intact(root, 1)


@pytest.fixture
def mount_point(tmp_path: Path):
    """Yield a function mounting with the given args at a fresh dir. CI runs as root, where mount works:
    a refused mount is a failure, not a skip."""
    mounted: list[Path] = []

    def mount(*args: str, target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        assert done.returncode == 0, f"mount {' '.join(args)} failed: {done.stderr.strip()}"
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def test_disk_full_on_small_tmpfs(tmp_path: Path, mount_point) -> None:
    base = make_base_dir(tmp_path / "base")
    small = mount_point("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=tmp_path / "small")
    root = small / "ckpt"
    store = CheckpointStore(root)
    first = save(root, base, 1, tensors=make_tensors(1, numel=1024), store=store)
    with pytest.raises(CheckpointError, match=r"no space left.*ENOSPC.*step-00000001 is still the latest"):
        save(root, base, 2, store=store)  # 32 MiB of weights into 2 MiB
    assert sorted(p.name for p in root.iterdir()) == [".lock", "latest", "step-00000001"]
    assert store.latest(verify_hash=True).content_hash == first.content_hash
    assert save(root, base, 3, tensors=make_tensors(3, numel=1024), store=store).step == 3


def test_root_under_a_regular_file_is_not_writable(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    (tmp_path / "file").write_text("not a directory")
    store = CheckpointStore(tmp_path / "file" / "ckpt")  # opening never fails
    assert store.latest() is None
    with pytest.raises(CheckpointError, match="not writable"):
        store.check_writable()
    with pytest.raises(CheckpointError, match="not writable.*ENOTDIR"):
        save(store.root, base, 1, tensors=make_tensors(1, numel=16), store=store)


def test_read_only_root_keeps_previous(tmp_path: Path, mount_point) -> None:
    base = make_base_dir(tmp_path / "base")
    root = tmp_path / "ckpt"
    first = save(root, base, 1, tensors=make_tensors(1, numel=16))
    mount_point("--bind", "-o", "ro", str(root), target=root)
    store = CheckpointStore(root)
    with pytest.raises(CheckpointError, match="not writable.*EROFS"):
        store.check_writable()
    with pytest.raises(CheckpointError, match="not writable.*EROFS"):
        save(root, base, 2, tensors=make_tensors(2, numel=16), store=store)
    assert store.latest(verify_hash=True).content_hash == first.content_hash
