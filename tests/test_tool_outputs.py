"""The offline tools (`export --out OUT`, `to-universal CKPT OUT`) write only into a new directory or one a
tool wrote (the marker file), refuse OUT equal to / inside / above the input, the working directory or an
unrelated directory, and remove their temporary directories on SIGTERM and SIGINT. Single process, no
DeepSpeed run: the refusals come before anything is read."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from sharded_msam_sf import checkpoint as universal_cli
from sharded_msam_sf import export as export_mod
from sharded_msam_sf import weights_io
from sharded_msam_sf.export import export, main
from sharded_msam_sf.output_dir import MARKER, OutputDirError
from tests.test_export import trained


def _job_like_run(tmp_path: Path) -> Path:
    """A run directory: checkpoints/step_000003/state.pt (+ latest), metrics.jsonl, an unrelated file."""
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_000003"
    ck.mkdir(parents=True)
    model, opt = trained("one_pass")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ck / "state.pt")
    (run / "checkpoints" / "latest").write_text("step_000003")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_refuses_outputs_that_would_lose_data(tmp_path, monkeypatch):
    run = _job_like_run(tmp_path)
    before = _tree(run)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    ck = run / "checkpoints"
    cases = [(run, "holds the input checkpoint"),                           # above the input: the whole run
             (ck / "step_000003", "is the input checkpoint"),                # the source itself
             (ck / "step_000003" / "x", "inside the input checkpoint"),      # breaks its manifest
             (unrelated, "was not written by this tool"),                    # someone else's directory
             (run / "metrics.jsonl", "is not a directory")]
    for out, msg in cases:
        with pytest.raises(OutputDirError, match=msg):
            export(ck, out)
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(OutputDirError, match="working directory"):
        export(ck, ".")
    assert main([str(ck), "--out", "."]) == 1  # a message, not a traceback
    assert _tree(run) == before and (unrelated / "thesis.tex").read_text() == "years of work"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_export_replaces_its_own_output_and_an_old_release_export(tmp_path):
    run = _job_like_run(tmp_path)
    out = export(run / "checkpoints", tmp_path / "x")
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    export(run / "checkpoints", tmp_path / "x")  # its own output: replaced
    old = tmp_path / "old"  # an export of the previous release: no marker, only export files
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"")
    (old / "export.json").write_text("{}")
    export(run / "checkpoints", old)
    assert (old / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    export(run / "checkpoints", empty)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "x")
    with pytest.raises(OutputDirError, match="is a symlink"):
        export(run / "checkpoints", link)


def _fake_deepspeed_ckpt(tmp_path: Path) -> Path:
    ck = tmp_path / "ds" / "global_step2"
    ck.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"x": torch.zeros(2)}, ck / name)
    return ck


def test_to_universal_refuses_the_same_outputs(tmp_path):
    ck = _fake_deepspeed_ckpt(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep").write_text("mine")
    for out, msg in [(ck, "is the input"), (ck / "u", "inside the input"), (tmp_path / "ds", "holds the input"),
                     (other, "was not written by this tool")]:
        with pytest.raises(OutputDirError, match=msg):
            universal_cli.to_universal(ck, out)
        assert universal_cli.main(["to-universal", str(ck), str(out)]) == 1
    assert (other / "keep").read_text() == "mine" and len(list(ck.iterdir())) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_tools_remove_their_temporary_directories(tmp_path, monkeypatch, signum):
    ck = _fake_deepspeed_ckpt(tmp_path)

    def interrupted(*args, **kwargs):  # the signal arrives while the converter writes
        Path(args[1]).mkdir(parents=True)
        (Path(args[1]) / "half").write_bytes(b"0" * 100)
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt")
    monkeypatch.setattr(universal_cli, "_converter", interrupted)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:
        universal_cli.main(["to-universal", str(ck), str(tmp_path / "u")])
    if signum == signal.SIGTERM:
        assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    run = _job_like_run(tmp_path)

    def interrupted_write(sd, path, meta):
        path.write_bytes(b"0" * 100)
        os.kill(os.getpid(), signum)
    monkeypatch.setattr(weights_io, "write_safetensors", interrupted_write)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        export_mod.main([str(run / "checkpoints"), "--out", str(tmp_path / "x"), "--quiet"])
    assert not list(tmp_path.rglob(".tmp-*")) and not (tmp_path / "u").exists() and not (tmp_path / "x").exists()


def test_errors_say_what_was_found(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    run = _job_like_run(tmp_path)
    ddp = run / "checkpoints" / "step_000003"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "fsdp"))
    uni = tmp_path / "universal"
    (uni / "zero" / "w").mkdir(parents=True)
    torch.save(torch.ones(2), uni / "zero" / "w" / "fp32.pt")
    torch.save({}, uni / "mp_rank_00_model_states.pt")
    for src, msg in [(tmp_path / "missing", "found nothing: the path does not exist"),
                     (ddp, "found a DDP / single-process checkpoint"), (tmp_path / "fsdp", "found a DCP checkpoint"),
                     (uni, "a DeepSpeed universal checkpoint")]:
        assert universal_cli.main(["to-universal", str(src), str(tmp_path / "u")]) == 1
        err = capsys.readouterr().err
        assert msg in err and "saved without its optimizer state" not in err, err
    assert main([str(uni), "--out", str(tmp_path / "x")]) == 1
    assert "a DeepSpeed universal checkpoint" in capsys.readouterr().err


_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save, disk full


def test_full_disk_is_named_by_to_universal_and_the_job_save(tmp_path, monkeypatch, capsys):
    from sharded_msam_sf.job.checkpoint import CheckpointError
    from tests.test_train_checkpoint import FakeEngine, save_steps
    ck = _fake_deepspeed_ckpt(tmp_path)

    def full(*args, **kwargs):
        raise RuntimeError(_SHORT_WRITE)
    monkeypatch.setattr(universal_cli, "_converter", full)
    assert universal_cli.main(["to-universal", str(ck), str(tmp_path / "u")]) == 1
    assert "error: no space left on device: " in capsys.readouterr().err
    assert not list(tmp_path.glob(".tmp-*"))
    run = save_steps(tmp_path / "run", [2])  # the DDP engine's torch.save fails so on a full disk
    state = {"engine": "fsdp2", "world_size": 1, "config": json.loads((tmp_path / "run" / "checkpoints" /
                                                                      "step_000002" / "job_state.json").read_text())["config"]}
    with pytest.raises(CheckpointError, match=r"no space left on device while writing .*\.tmp-step_000004"):
        run.save(FakeEngine(fail=RuntimeError(_SHORT_WRITE)), 4, state)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000002"


def test_a_real_full_tmpfs(tmp_path):
    """The same on a 256 KiB tmpfs (needs root to mount it; CI containers run as root)."""
    import subprocess
    from sharded_msam_sf.job.checkpoint import CheckpointError, Checkpointer
    from tests.test_train_checkpoint import cfg_for
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); test_full_disk_is_named_by_... injects the error")
    try:
        class Big:
            def save(self, path):
                torch.save({"w": torch.zeros(1 << 18)}, path / "state.pt")  # 1 MiB
        ck = Checkpointer(tiny, 0, 2, 1, run_id="r")
        state = {"engine": "ddp", "world_size": 1, "config": cfg_for(tiny, engine="ddp").to_dict()}
        with pytest.raises(CheckpointError, match=r"no space left on device while writing .*\.tmp-step_000001"):
            ck.save(Big(), 1, state)
        assert not list((tiny / "checkpoints").glob(".tmp-*"))
    finally:  # lazy: the failed torch.save's file is still referenced by the exception's frames
        subprocess.run(["umount", "-l", str(tiny)], check=True)


def test_the_jobs_conversion_and_save_name_a_full_disk():
    from sharded_msam_sf.job.checkpoint import CheckpointError, _describe_error
    assert _describe_error(RuntimeError(_SHORT_WRITE), "checkpoint /r/.tmp-step_000004").startswith(
        "no space left on device while writing checkpoint /r/.tmp-step_000004")
    # the job's automatic conversion: the to-universal subprocess's message comes back in the error
    failed = CheckpointError("converting /r/checkpoints/step_000002 into a universal checkpoint failed (exit 1):\n"
                             "error: no space left on device: /r/universal (writing ...)")
    assert _describe_error(failed, "universal checkpoint /r/universal/.tmp-step_000002").startswith(
        "no space left on device while writing universal checkpoint /r/universal/.tmp-step_000002")
