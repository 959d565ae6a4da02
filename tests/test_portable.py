"""Portable (engine-neutral) optimizer checkpoints and ``checkpoint convert``.

Train K steps on engine A, write the portable checkpoint (one safetensors file, or DCP: sharded from
FSDP2), convert, resume on engine B, run to N: the x weights equal the uninterrupted single-process run
(≤ 1e-6 fp32), both modes, saved in train and in eval mode. Pairs here: single → single (file, DCP),
FSDP2 (2 ranks) → single (file, sharded DCP), single → FSDP2 (sharded DCP load), single → DDP, FSDP2 →
DDP. Converted twice = byte-identical to once; foreign / mismatched / truncated inputs are clear errors
that change and write nothing; DST inside/above/equal to SRC is refused.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf import portable as P
from sharded_msam_sf.convert import FILE_NAME, convert
from tests import sharded_common as C
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")
K, N = 3, 7
TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


def opt_for(model, mode):
    return AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **C.HP)


def single_run(mode: str, steps: int, *, at_eval: bool = False):
    model = C.make_model()
    opt = opt_for(model, mode)
    C.run_loop(model, opt, mode=mode, steps=steps, dp_rank=0, dp_size=1, final_eval=at_eval)
    return model, opt


def resume_single(p: P.Portable, mode: str):
    model = C.make_model(seed=123)  # other weights: everything must come from the checkpoint
    opt = opt_for(model, mode)
    P.to_optimizer(p, model, opt)
    C.run_loop(model, opt, mode=mode, steps=N, dp_rank=0, dp_size=1, start=K)
    return C.full_weights(model)


@pytest.fixture(scope="module")
def reference():
    out = {}
    for mode in MODES:
        model, _ = single_run(mode, N, at_eval=True)
        out[mode] = C.full_weights(model)
    return out


@pytest.mark.parametrize("at_eval", [False, True], ids=["saved_in_train", "saved_in_eval"])
@pytest.mark.parametrize("container", ["state_dict", "dcp"])
@pytest.mark.parametrize("mode", MODES)
def test_single_process_round_trip(tmp_path, reference, mode, container, at_eval):
    model, opt = single_run(mode, K, at_eval=at_eval)
    p = P.from_optimizer(model, opt)
    if container == "state_dict":
        back = P.load_file(P.save_file(p, tmp_path / "a.safetensors"))
    else:
        back = P.load_dcp(P.save_dcp(p, tmp_path / "a"))
    assert sorted(back.tensors) == sorted(p.tensors)
    assert back.groups == p.groups
    assert back.groups[0]["train_mode"] == (not at_eval) and back.groups[0]["k"] == K
    diff = C.max_abs_diff(reference[mode], resume_single(back, mode))
    print(f"DIFF single->{container}->single {mode} {'eval' if at_eval else 'train'} {diff:.2e}")
    assert diff <= TOL


def _sha(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    return {str(q.relative_to(path) if path.is_dir() else q.name): hashlib.sha256(q.read_bytes()).hexdigest()
            for q in files}


def test_converted_twice_is_byte_identical_to_once(tmp_path):
    model, opt = single_run("one_pass", K)
    P.save_file(P.from_optimizer(model, opt), tmp_path / "src.safetensors")
    once = convert(tmp_path / "src.safetensors", tmp_path / "once", "dcp")
    twice = convert(convert(once, tmp_path / "mid", "state_dict"), tmp_path / "twice", "dcp")
    assert _sha(once) == _sha(twice)
    f1 = convert(once, tmp_path / "f1", "state_dict")
    f2 = convert(convert(f1, tmp_path / "f1d", "dcp"), tmp_path / "f2", "state_dict")
    assert _sha(f1) == _sha(f2)
    assert P.load_file(f1).tensors.keys() == P.load_file(tmp_path / "src.safetensors").tensors.keys()


def test_cli(tmp_path):
    model, opt = single_run("two_pass", K)
    P.save_file(P.from_optimizer(model, opt), tmp_path / "a.safetensors")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sharded_msam_sf.checkpoint", "convert"]
    ok = subprocess.run(cmd + [str(tmp_path / "a.safetensors"), str(tmp_path / "d"), "--to", "dcp"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert P.is_portable_dcp(tmp_path / "d") and "portable checkpoint (dcp)" in ok.stdout
    from sharded_msam_sf.checkpoint import main
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "d" / "inside"), "--to", "state_dict"]) == 1
    assert not (tmp_path / "d" / "inside").exists()


def test_bad_inputs_are_clear_errors_that_write_nothing(tmp_path):
    model, opt = single_run("one_pass", K)
    good = P.save_file(P.from_optimizer(model, opt), tmp_path / "good.safetensors")
    # a model-weights file (safetensors without our header)
    from safetensors.torch import save_file as st_save
    st_save({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    # a truncated file
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    # a foreign optimizer's state in our container: torch AdamW's groups
    adamw = torch.optim.AdamW(model.parameters())
    foreign = P.Portable({f"y/{n}": p.detach() for n, p in model.named_parameters()},
                         [dict(adamw.param_groups[0], params=[n for n, _ in model.named_parameters()])])
    foreign.groups[0] = {k: P._jsonable(k, v) for k, v in foreign.groups[0].items()}
    from safetensors.torch import save_file as raw
    raw({k: v.contiguous() for k, v in foreign.tensors.items()}, str(tmp_path / "adamw.safetensors"),
        metadata={"header": foreign.header()})
    cases = {"weights.safetensors": "not a portable checkpoint", "cut.safetensors": "truncated",
             "adamw.safetensors": "not a checkpoint of AdamWMSAMScheduleFree"}
    for name, msg in cases.items():
        with pytest.raises(P.PortableError, match=msg):
            convert(tmp_path / name, tmp_path / f"out-{name}", "dcp")
        assert not (tmp_path / f"out-{name}").exists()
        assert not [q for q in tmp_path.iterdir() if q.name.startswith(".tmp-")]
    # mismatched names: another model; nothing of it changes
    other = torch.nn.Sequential(torch.nn.Linear(C.D_IN, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(P.PortableError, match="names differ"):
        P.to_optimizer(P.load_file(good), other, opt_for(other, "one_pass"))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    # another sam_mode
    m2 = C.make_model()
    with pytest.raises(P.PortableError, match="sam_mode"):
        P.to_optimizer(P.load_file(good), m2, opt_for(m2, "two_pass"))
    # DST: exists / SRC itself / above SRC
    (tmp_path / "exists").mkdir()
    for dst, msg in ((tmp_path / "exists", "exists"), (good, "is SRC"), (tmp_path, "above it")):
        with pytest.raises(P.PortableError, match=msg):
            convert(good, dst, "state_dict")


# ---------------------------------------------------------------------- 2 ranks: FSDP2, DDP
def _ranks(rank, world_size, tmp: str, single_files: dict):
    import torch.distributed as dist
    tmp = Path(tmp)
    out = {}
    for mode in MODES:
        # FSDP2 trains K steps and writes both containers (DCP sharded: each rank its shards)
        model = C.wrap("fsdp2", C.make_model())
        opt = opt_for(model, mode)
        C.run_loop(model, opt, mode=mode, steps=K, dp_rank=rank, dp_size=world_size, final_eval=False)
        sharded = P.from_optimizer(model, opt, full=False)
        assert any(hasattr(t, "placements") for t in sharded.tensors.values())   # DTensors: not gathered
        P.save_dcp(sharded, tmp / f"fsdp2-{mode}")
        full = P.from_optimizer(model, opt, full=True)
        if rank == 0:
            P.save_file(full, tmp / f"fsdp2-{mode}.safetensors")
        dist.barrier()
        # FSDP2 <- the single-process checkpoint, read sharded from its DCP copy
        model = C.wrap("fsdp2", C.make_model(seed=5))
        opt = opt_for(model, mode)
        template = P.from_optimizer(model, opt, full=False)
        P.to_optimizer(P.load_dcp(single_files[mode]["dcp"], template=template), model, opt, full=False)
        C.run_loop(model, opt, mode=mode, steps=N, dp_rank=rank, dp_size=world_size, start=K)
        out[("single->fsdp2", mode)] = {k: v.tolist() for k, v in C.full_weights(model).items()}
        # DDP <- the single-process file, and <- the FSDP2 file
        for name, src in (("single->ddp", single_files[mode]["file"]),
                          ("fsdp2->ddp", tmp / f"fsdp2-{mode}.safetensors")):
            inner = C.make_model(seed=7)
            ddp = C.wrap("ddp", inner)
            opt = opt_for(inner, mode)
            P.to_optimizer(P.load_file(src), inner, opt)
            C.run_loop(ddp, opt, mode=mode, steps=N, dp_rank=rank, dp_size=world_size, start=K)
            out[(name, mode)] = {k: v.tolist() for k, v in C.full_weights(inner).items()}
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portable_ranks")
    files = {}
    for mode in MODES:
        model, opt = single_run(mode, K)
        p = P.from_optimizer(model, opt)
        files[mode] = {"file": str(P.save_file(p, tmp / f"single-{mode}.safetensors")),
                       "dcp": str(P.save_dcp(p, tmp / f"single-{mode}"))}
    return tmp, run_ranks(_ranks, 2, str(tmp), files, timeout=300)


@pytest.mark.parametrize("pair", ["single->fsdp2", "single->ddp", "fsdp2->ddp", "fsdp2->single (file)",
                                  "fsdp2->single (sharded dcp)"])
@pytest.mark.parametrize("mode", MODES)
def test_engine_pairs_continue_the_single_process_run(two_ranks, reference, pair, mode):
    tmp, runs = two_ranks
    if pair == "fsdp2->single (file)":
        results = {0: resume_single(P.load_file(tmp / f"fsdp2-{mode}.safetensors"), mode)}
    elif pair == "fsdp2->single (sharded dcp)":
        results = {0: resume_single(P.load_dcp(tmp / f"fsdp2-{mode}"), mode)}
    else:
        results = {r: {k: torch.tensor(v) for k, v in out[(pair, mode)].items()} for r, out in runs.items()}
    for rank, weights in results.items():
        diff = C.max_abs_diff(reference[mode], weights)
        print(f"DIFF {pair} {mode} rank {rank} {diff:.2e}")
        assert diff <= TOL, (pair, mode, rank, diff)
