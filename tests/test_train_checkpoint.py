"""The main job's checkpoint files: atomic writes, what counts as complete, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from sharded_msam_sf.job.checkpoint import (STATE_FILE, CheckpointError, Checkpointer, atomic_torch_save,
                                            load_torch_file)


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"model": {"w": torch.arange(10_000.0)}}, path)
    assert torch.equal(load_torch_file(path)["model"]["w"], torch.arange(10_000.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_torch_file(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_torch_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_file(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.nn.Linear(2, 2)}, path)  # a pickled module: code, not data
    with pytest.raises(CheckpointError):
        load_torch_file(path)


def test_atomic_save_leaves_no_temporary_and_replaces_whole(tmp_path):
    path = tmp_path / "a.pt"
    atomic_torch_save({"v": 1}, path)
    atomic_torch_save({"v": 2}, path)
    assert load_torch_file(path) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_latest_skips_partial_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, rank=0, keep=2)
    assert ck.latest() is None
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        (root / Checkpointer.name(step)).mkdir(parents=True)
        (root / Checkpointer.name(step) / STATE_FILE).write_text(json.dumps({"step": step}))
    (root / ".tmp-step_000030").mkdir()  # a save interrupted before its rename
    (root / "step_000040").mkdir()  # no job_state.json: not complete
    assert ck.latest().name == "step_000020"
    (root / "latest").write_text("step_000010")
    assert ck.latest().name == "step_000010"  # the pointer wins when it names a complete checkpoint
    (root / "latest").write_text("step_000040")
    assert ck.latest().name == "step_000020"  # ... and is ignored when it does not
    assert Checkpointer.read_state(ck.latest())["step"] == 20
    (root / "step_1000000").mkdir()  # past six digits: ordered by number, not by name
    (root / "step_1000000" / STATE_FILE).write_text(json.dumps({"step": 1000000}))
    (root / "latest").unlink()
    assert ck.latest().name == "step_1000000"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Checkpointer.read_state(root / "step_000040")
