"""Checkpoints without manifest.json (those of earlier releases) are refused, naming `seal`, or adopted with
checkpoint.adopt_unsealed=true, and never overwritten or removed; a fresh run keeps the old metrics.jsonl;
a step directory replaced by a symlink is refused; `seal` and the offline tools load such checkpoints only
with the safe loaders (a planted pickle is refused and never runs). Single process, no process group."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sharded_msam_sf import checkpoint as checkpoint_cli
from sharded_msam_sf.checkpoint_seal import seal
from sharded_msam_sf.export import ExportError, export
from sharded_msam_sf.job.checkpoint import (MANIFEST, STATE_FILE, CheckpointError, Checkpointer, RunDirError,
                                            plan_resume, read_manifest)
from sharded_msam_sf.job.progress import Progress
from sharded_msam_sf.safe_load import check_loads
from tests.test_train_checkpoint import Planted, cfg_for


class DcpEngine:
    """Writes a real DCP checkpoint (what the FSDP engines write)."""

    def __init__(self, value: float = 1.0):
        self.value = value

    def save(self, path):
        import torch.distributed.checkpoint as dcp
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"model": {"w": torch.full((8,), self.value)}, "extra": {"lr": 0.5}},
                     checkpoint_id=str(path))


def old_release_run(out: Path, steps=(2, 4)) -> Path:
    """A run of the previous release: step dirs with job_state.json (no run id) and no manifest."""
    cfg = cfg_for(out)
    ck = Checkpointer(out, 0, 10, 1, run_id="tmp")
    for s in steps:
        ck.save(DcpEngine(float(s)), s, {"engine": "fsdp2", "world_size": 1, "config": cfg.to_dict()})
    for s in steps:
        d = out / "checkpoints" / f"step_{s:06d}"
        (d / MANIFEST).unlink()
        state = json.loads((d / STATE_FILE).read_text())
        del state["run_id"]
        (d / STATE_FILE).write_text(json.dumps(state))
    (out / "metrics.jsonl").write_text('{"step": 4, "train_loss": 3.0}\n')
    return out / "checkpoints"


def _bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_unsealed_checkpoints_are_refused_naming_seal_and_never_overwritten(tmp_path):
    root = old_release_run(tmp_path)
    before = _bytes(root)
    for resume in ("auto", "must", "never"):
        with pytest.raises(RunDirError, match=r"without manifest.json: step_000002, step_000004 .*"
                                              r"python -m sharded_msam_sf.checkpoint seal .*adopt_unsealed=true"):
            plan_resume(cfg_for(tmp_path, f"checkpoint.resume={resume}"), Checkpointer(tmp_path, 0, 2))
    with pytest.raises(RunDirError, match="without manifest.json: .*checkpoint seal"):  # an explicit path
        plan_resume(cfg_for(tmp_path, f"checkpoint.resume={root / 'step_000004'}"), Checkpointer(tmp_path, 0, 2))
    with pytest.raises(CheckpointError, match="no manifest.json .*checkpoint seal"):  # one from elsewhere
        plan_resume(cfg_for(tmp_path / "b", f"checkpoint.resume={root / 'step_000004'}"),
                    Checkpointer(tmp_path / "b", 0, 2))
    new = Checkpointer(tmp_path, 0, 1, 1, run_id="new-run")  # a save of the same step by another run
    state = {"engine": "fsdp2", "world_size": 1, "config": cfg_for(tmp_path).to_dict()}
    with pytest.raises(CheckpointError, match="step_000004 exists and was not written by this run"):
        new.save(DcpEngine(9.0), 4, state)
    new.save(DcpEngine(9.0), 6, state)  # pruning (keep=1) never removes another run's or an unsealed checkpoint
    new.save(DcpEngine(9.0), 8, state)
    assert {k: v for k, v in _bytes(root).items() if k.startswith(("step_000002", "step_000004"))} == \
        {k: v for k, v in before.items() if k.startswith("step_")}


def test_seal_then_resume_and_adopt_unsealed(tmp_path):
    root = old_release_run(tmp_path / "a")
    assert checkpoint_cli.main(["seal", "--check", str(root)]) == 0
    assert not (root / "step_000004" / MANIFEST).exists()  # --check writes nothing
    assert checkpoint_cli.main(["seal", str(tmp_path / "a")]) == 0
    m2, m4 = read_manifest(root / "step_000002"), read_manifest(root / "step_000004")
    assert m2["run_id"] == m4["run_id"] and m4["sealed_by"].endswith("checkpoint seal") and m4["step"] == 4
    plan = plan_resume(cfg_for(tmp_path / "a"), Checkpointer(tmp_path / "a", 0, 2))
    assert plan.path == root / "step_000004" and plan.run_id == m4["run_id"]
    assert seal(root) == [f"{root / 'step_000002'}: sealed already, verifies",
                          f"{root / 'step_000004'}: sealed already, verifies"]
    # adopt: the job seals them itself and resumes
    old_release_run(tmp_path / "b")
    plan = plan_resume(cfg_for(tmp_path / "b", "checkpoint.adopt_unsealed=true"), Checkpointer(tmp_path / "b", 0, 2))
    assert plan.path.name == "step_000004" and any("adopted (checkpoint.adopt_unsealed)" in n for n in plan.notes)


def test_seal_refuses_a_planted_pickle_without_running_it(tmp_path):
    root = old_release_run(tmp_path / "run")
    ran = tmp_path / "code-ran"
    bad = root / "step_000004"
    (bad / ".metadata").write_bytes(pickle.dumps(Planted(ran)))
    assert checkpoint_cli.main(["seal", str(bad)]) == 1
    with pytest.raises(RunDirError, match="(?s)sealing failed .*not one of torch's DCP metadata classes"):
        plan_resume(cfg_for(tmp_path / "run", "checkpoint.adopt_unsealed=true"), Checkpointer(tmp_path / "run", 0, 2))
    torch.save({"x": Planted(ran)}, root / "step_000002" / "extra.pt")
    assert any("extra.pt does not load with torch.load(weights_only=True)" in p for p in check_loads(root / "step_000002"))
    with pytest.raises(ExportError, match="not one of torch's DCP metadata classes"):  # export of DCP, no manifest
        export(bad, tmp_path / "x")
    assert not ran.exists() and not (bad / MANIFEST).exists()


def test_dcp_items_are_read_with_weights_only(tmp_path):
    """DCP's own loader reads non-tensor items with weights_only=False; check_loads and export do not."""
    import torch.distributed.checkpoint as dcp
    ran = tmp_path / "code-ran"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": {"w": torch.ones(2)}, "extra": {"obj": Planted(ran)}}, checkpoint_id=str(tmp_path / "c"))
    problems = check_loads(tmp_path / "c")
    assert any("item extra.obj does not load with weights_only=True" in p for p in problems) and not ran.exists()


def test_to_universal_reads_with_weights_only(tmp_path):
    ck = tmp_path / "ds" / "global_step2"
    ck.mkdir(parents=True)
    ran = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": Planted(ran)}, ck / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": Planted(ran)}, ck / "mp_rank_00_model_states.pt")
    assert checkpoint_cli.main(["to-universal", str(ck), str(tmp_path / "u")]) == 1
    assert not ran.exists() and not (tmp_path / "u").exists()


def test_a_symlinked_step_dir_is_refused(tmp_path):
    root = old_release_run(tmp_path / "run")
    assert checkpoint_cli.main(["seal", str(root)]) == 0
    shutil.move(root / "step_000004", tmp_path / "elsewhere")
    (root / "step_000004").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunDirError, match="step_000004 is a symlink .*never loads a checkpoint through a link"):
        plan_resume(cfg_for(tmp_path / "run"), Checkpointer(tmp_path / "run", 0, 2))


def test_a_fresh_run_keeps_the_old_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')
    progress = Progress(True, tmp_path, "none", 0, 10, 1)
    aside = progress.truncate_metrics(0, fresh=True)
    assert aside.read_text() == '{"step": 7}\n' and not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 5}\n')
    assert progress.truncate_metrics(3) is None  # resuming at step 3: this run's later records go
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_empty_out_dir_is_refused(tmp_path):
    from sharded_msam_sf.job.config import ConfigError
    with pytest.raises(ConfigError, match="'log.out_dir' is empty"):
        cfg_for("")
