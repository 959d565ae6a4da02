"""DeepSpeed ZeRO-2 / ZeRO-3 (2 ranks) → portable → FSDP2 (2 ranks), DDP (2 ranks) and one process: the resumed run
equals the uninterrupted single-process run (≤ 1e-6 fp32), both modes. One 2-rank start-up: the ranks
train K steps under DeepSpeed and save; rank 0 converts (``convert``, which runs ``to_universal``); the
ranks resume under FSDP2; the single-process resumes run here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402
from sharded_msam_sf import portable as P  # noqa: E402
from tests import ds_scenarios as S  # noqa: E402

MODES = ("one_pass", "two_pass")
STAGES = (2, 3)
K, N = 3, 6
TOL = 1e-6


def make_opt(model, mode):
    return AdamWMSAMScheduleFree(S.param_groups(model, 0.02), lr=0.02, rho=0.05, sam_mode=mode, betas=(0.9, 0.99),
                                 weight_decay=0.1, warmup_steps=2)


def plain_train(model, opt, mode, start, steps, rank=0, world=1):
    opt.train()
    per = S.GLOBAL_BATCH // world

    def backward(x, y):
        S.loss_fn(model(x), y).backward()
    for k in range(start, steps):
        x, y = S.batch(k)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        backward(x, y)
        if mode == "two_pass":
            opt.move_to_ascent()
            backward(x, y)
            opt.move_from_ascent()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()


def _ranks(rank, world, record, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sharded_msam_sf.checkpoint import to_universal
    from sharded_msam_sf.convert import convert
    out = Path(out_dir)
    for stage in STAGES:
        for mode in MODES:
            case = f"zero{stage}-{mode}"
            def body():
                engine, opt = S.make_engine(S.ds_config(stage, sam_mode=mode))
                opt.train()
                S.ds_train(engine, opt, K, mode)
                engine.save_checkpoint(str(out / case), tag="k")
                dist.barrier()
                if rank == 0:
                    convert(out / case / "k", out / f"{case}-portable", "state_dict", to_universal)
                dist.barrier()
                model = S.make_model(seed=9)
                fully_shard(model)
                fopt = make_opt(model, mode)
                P.to_optimizer(P.load_file(out / f"{case}-portable" / "portable.safetensors"), model, fopt)
                plain_train(model, fopt, mode, K, N, rank, world)
                from tests.sharded_common import full_weights
                record(case, fsdp2={k: v.tolist() for k, v in full_weights(model).items()})
                from torch.nn.parallel import DistributedDataParallel as DDP
                inner = S.make_model(seed=11)
                dopt = make_opt(inner, mode)
                P.to_optimizer(P.load_file(out / f"{case}-portable" / "portable.safetensors"), inner, dopt)
                plain_train(DDP(inner), dopt, mode, K, N, rank, world)
                record(case, ddp={n: q.detach().tolist() for n, q in inner.named_parameters()})
            record.case(case, body)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    S.build_shm_op()
    out = tmp_path_factory.mktemp("portable_ds")
    return out, S.run_cases(_ranks, out, str(out), timeout=600)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_to_fsdp2_and_single_process(runs, stage, mode):
    out, results = runs
    case = f"zero{stage}-{mode}"
    ref = S.reference_run(N, mode)
    for r, values in enumerate(S.case_values(results, case)):
        for engine in ("fsdp2", "ddp"):
            got = {k: torch.tensor(v) for k, v in values[engine].items()}
            diff = S.max_diff(ref, got)
            print(f"DIFF zero{stage}->{engine} {mode} rank {r} {diff:.2e}")
            assert diff <= TOL
    model = S.make_model(seed=9)
    opt = make_opt(model, mode)
    p = P.load_file(out / f"{case}-portable" / "portable.safetensors")
    assert p.groups[0]["k"] == K and p.groups[0]["sam_mode"] == mode
    P.to_optimizer(p, model, opt)
    plain_train(model, opt, mode, K, N)
    diff = S.max_diff(ref, {n: q.detach() for n, q in model.named_parameters()})
    print(f"DIFF zero{stage}->single {mode} {diff:.2e}")
    assert diff <= TOL
