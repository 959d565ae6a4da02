"""The offline x export of the main job's checkpoints (DeepSpeed ZeRO-1/ZeRO-3, FSDP1's and FSDP2's DCP, DDP's state.pt,
2 ranks) equals the job's live export file bit for bit; DeepSpeed's zero_to_fp32 gives the training point
(the checkpoint says so and names the export command); bad DeepSpeed inputs name the file."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sharded_msam_sf.export import ExportError, export
from sharded_msam_sf.weights_io import DEEPSPEED_README
from sharded_msam_sf.weights_io import load_weights
from tests.test_train_run import deepspeed_op_built, run_job  # noqa: F401 (the fixture builds DeepSpeed's op once)

pytestmark = pytest.mark.slow
SHORT = ("train.max_steps=2", "eval.interval=0", "checkpoint.interval=2", "log.plot=false")
CONFIGS = {"zero1": "configs/job/zero1-cpu.json", "zero3": "configs/job/zero3-cpu.json",
           "fsdp2": "configs/job/fsdp2-cpu.json", "fsdp1": "configs/job/fsdp1-cpu.json",
           "ddp": "configs/job/ddp-cpu.json"}
_runs: dict = {}


def job(name: str, tmp_path_factory) -> Path:
    """out_dir of a 2-rank, 2-step run of the config (one run per config and test session)."""
    if name not in _runs:
        out = tmp_path_factory.mktemp(f"job-{name}")
        run_job(CONFIGS[name], out, *SHORT)
        _runs[name] = out
    return _runs[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_offline_export_of_the_last_checkpoint_is_the_live_export(name, tmp_path, tmp_path_factory):
    out = job(name, tmp_path_factory)
    ckpt = out / "checkpoints" / "step_000002"
    x = export(out / "checkpoints", tmp_path / "x")  # `latest` names step_000002
    assert (x / "model.safetensors").read_bytes() == (out / "export" / "model.safetensors").read_bytes()
    live, live_meta = load_weights(out / "export")
    offline, meta = load_weights(x)
    assert meta == live_meta and meta["step"] == 2 and meta["weights"] == "x"
    if name.startswith("zero"):  # the saved fp32 masters are the training point, not x
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        y = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        assert set(y) == set(live)
        assert any(not torch.equal(y[k].float(), live[k]) for k in live)
        note = (ckpt / DEEPSPEED_README).read_text()
        assert "zero_to_fp32.py" in note and "python -m sharded_msam_sf.export step_000002 --out" in note


def _copy_without_manifest(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    return dst


def test_bad_deepspeed_inputs_name_the_file(tmp_path, tmp_path_factory):
    ckpt = job("zero1", tmp_path_factory) / "checkpoints" / "step_000002"
    out = tmp_path / "x"
    # corrupt, with the job's manifest: refused before anything is unpickled, the file named
    bad = tmp_path / "corrupt"
    shutil.copytree(ckpt, bad)
    f = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its SHA-256"):
        export(bad, out)
    # truncated, no manifest
    bare = _copy_without_manifest(ckpt, tmp_path / "truncated")
    f = bare / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ExportError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt .*truncated"):
        export(bare, out)
    # a missing rank's file
    bare = _copy_without_manifest(ckpt, tmp_path / "missing")
    (bare / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ExportError, match=r"rank\(s\) \[0\] is missing \(zero_pp_rank_0_mp_rank_00_optim_states.pt\)"):
        export(bare, out)
    # a mismatched model: another model's model-states file
    bare = _copy_without_manifest(ckpt, tmp_path / "mismatched")
    sd = torch.load(bare / "mp_rank_00_model_states.pt", weights_only=True)
    sd["param_shapes"] = [{**{k: v for k, v in g.items()}, "extra.weight": torch.Size([64, 64])}
                          for g in sd["param_shapes"]]
    torch.save(sd, bare / "mp_rank_00_model_states.pt")
    with pytest.raises(ExportError, match="mismatched: the partitions do not add up .* a mismatched model state file"):
        export(bare, out)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_to_universal_of_a_zero3_checkpoint_and_bad_input(tmp_path, tmp_path_factory):
    """ZeRO-3 sources convert (the resume is tested in test_universal.py and test_train_universal.py); a
    corrupt source is refused naming the file, and nothing is written."""
    from sharded_msam_sf.checkpoint import main
    ckpt = job("zero3", tmp_path_factory) / "checkpoints" / "step_000002"
    assert main(["to-universal", str(ckpt), str(tmp_path / "u")]) == 0
    params = [p for p in (tmp_path / "u" / "zero").iterdir() if p.is_dir()]
    assert params and all((p / "z.pt").is_file() for p in params)
    assert (tmp_path / "u" / "mp_rank_00_model_states.pt").is_file()
    bad = tmp_path / "corrupt"
    shutil.copytree(ckpt, bad)
    f = bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["to-universal", str(bad), str(tmp_path / "u2")]) == 1
    assert not (tmp_path / "u2").exists() and not list(tmp_path.glob(".tmp-*"))
