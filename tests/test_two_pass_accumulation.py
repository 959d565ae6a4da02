"""two_pass with gradient accumulation in our own loop (:func:`sharded_msam_sf.accumulation.two_pass_step`) and
the one clipping rule (clip g, the gradient the update uses; g0 folded unclipped): one process, DDP and FSDP2 on
2 gloo ranks x 2 micro-batches against the single-process loop on the same global batch, with the collectives
per step (2 gradient reductions — DDP comm-hook calls / FSDP2 reduce-scatters — and 2 stats all-reduces of
G + 1 float64; DDP with ``model=`` for its agreeing back end: without it DDP's stats are local, 0 all-reduces).
The main job's two_pass with ``train.grad_accum = 2`` and ``train.grad_clip`` acting, under DDP and FSDP2 (the
job's own ``run()`` in the same 2 rank processes, one start-up for the file): its exported x against the plain
single-process loop on the job's global batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.accumulation import two_pass_step
from tests.harness import run_ranks
from tests.models import batch, flat, mse, tiny_mlp

HP = dict(lr=0.02, rho=0.05, warmup_steps=2, sam_mode="two_pass")
STEPS, N, CLIP = 4, 16, 0.05   # CLIP is below every step's gradient norm here: clipping acts
TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIG = str(ROOT / "configs/job/ddp-cpu.json")
JOB_STEPS, JOB_TOL = 3, 1e-5
JOB = [f"train.max_steps={JOB_STEPS}", "optimizer.params.sam_mode=two_pass", f"train.grad_clip={CLIP}",
       f"eval.interval={JOB_STEPS}", f"checkpoint.interval={JOB_STEPS}", "log.interval=1", "log.plot=false",
       "log.tensorboard=false", "log.progress=lines"]


def reference(steps=STEPS, clip=CLIP, clip_g0=False, rows=N):
    """The plain two_pass loop on the whole batch, clipping g (and, to show it matters, g0 with clip_g0)."""
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), **HP)
    x, y = batch(n=rows)
    opt.train()
    for _ in range(steps):
        mse(model, x, y).backward()
        if clip_g0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.move_to_ascent()
        mse(model, x, y).backward()
        opt.move_from_ascent()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()
    return flat(model)


def _micro(x, y, rank, world, n_micro):
    """Rank ``rank``'s ``n_micro`` micro-batches of the global batch (equal sizes: their mean is the global mean)."""
    xs, ys = x.chunk(world)[rank].chunk(n_micro), y.chunk(world)[rank].chunk(n_micro)
    return list(zip(xs, ys))


def test_one_process_four_micro_batches_equal_the_whole_batch():
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), **HP)
    x, y = batch(n=N)
    opt.train()
    norms = []
    for _ in range(STEPS):
        def clip():
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        two_pass_step(opt, _micro(x, y, 0, 1, 4), lambda b: mse(model, *b), clip=clip)
    opt.eval()
    assert min(norms) > CLIP  # clipping acted on every step
    ref = reference()
    assert (flat(model) - ref).abs().max().item() <= TOL
    print(f"MAXDIFF two_pass_step 1 process 4 micro-batches clip {(flat(model) - ref).abs().max().item():.2e}")
    assert (ref - reference(clip=0.0)).abs().max().item() > 1e-4       # clipping changes the trajectory
    assert (ref - reference(clip_g0=True)).abs().max().item() > 1e-4    # and clipping g0 too would be another one
    assert [g["k"] for g in opt.param_groups] == [STEPS]


def test_refuses_one_pass():
    opt = AdamWMSAMScheduleFree(tiny_mlp().parameters(), lr=0.01)
    with pytest.raises(ValueError, match="sam_mode='two_pass'"):
        two_pass_step(opt, [None], lambda b: None)


def _engines(rank, world_size, out_root):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sharded_msam_sf.testing.comm_count import CommCounter
    x, y = batch(n=N)
    micro = _micro(x, y, rank, world_size, 2)
    out = {}
    for engine in ("ddp", "fsdp2"):
        module = tiny_mlp()
        hooks = [0]
        if engine == "ddp":
            model = DDP(module)

            def counting_hook(state, bucket):
                hooks[0] += 1
                fut = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])
            model.register_comm_hook(None, counting_hook)
        else:
            model = fully_shard(module)
        opt = AdamWMSAMScheduleFree(model.parameters(), model=model, **HP)  # DDP: the agreeing DDPBackend
        opt.train()
        grad_reductions, stats = [], []
        for _ in range(STEPS):
            before = hooks[0]
            with CommCounter() as cc:
                two_pass_step(opt, micro, lambda b: mse(model, *b), model=model,
                              clip=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
            stats.append(sum(1 for c in cc.records if c.name == "all_reduce" and c.shape == (2,)))
            grad_reductions.append(hooks[0] - before if engine == "ddp" else
                                   sum(1 for c in cc.records if c.name.startswith("reduce_scatter")))
        opt.eval()
        if engine == "ddp":
            final = flat(module)
        else:
            final = torch.cat([p.full_tensor().detach().reshape(-1) for p in module.parameters()])
        out[engine] = dict(final=final.tolist(), grads=grad_reductions, stats=stats)
    _jobs(rank, world_size, out_root)
    return out


def _jobs(rank, world_size, out_root):
    from sharded_msam_sf.job.config import load_config
    from sharded_msam_sf.job.data import load_corpus
    from sharded_msam_sf.job.engines import build_engine, init_distributed
    from sharded_msam_sf.job.trainer import run
    for engine in ("ddp", "fsdp2"):
        cfg = load_config(JOB_CONFIG, JOB + [f"engine.name={engine}", "train.micro_batch_size=4",
                                             f"log.out_dir={out_root}/{engine}"], world_size=world_size)
        assert cfg.grad_accum == 2
        env = init_distributed(cfg)
        job = build_engine(cfg, env)
        run(cfg, env, job, load_corpus(cfg))
        job.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs")
    return run_ranks(_engines, 2, str(out), timeout=360), out


def test_ddp_and_fsdp2_two_ranks_two_micro_batches_equal_the_global_batch(ranks):
    runs = ranks[0]
    ref = reference()
    for rank, r in runs.items():
        for engine in ("ddp", "fsdp2"):
            diff = (torch.tensor(r[engine]["final"]) - ref).abs().max().item()
            assert diff <= TOL, (rank, engine, diff)
            assert r[engine]["grads"] == [2] * STEPS, (rank, engine, r[engine]["grads"])
            assert r[engine]["stats"] == [2] * STEPS, (rank, engine, r[engine]["stats"])
        print(f"MAXDIFF two_pass accum2 clip rank{rank} ddp "
              f"{(torch.tensor(r['ddp']['final']) - ref).abs().max().item():.2e} fsdp2 "
              f"{(torch.tensor(r['fsdp2']['final']) - ref).abs().max().item():.2e}")


def job_reference(clip: float, clip_g0: bool = False) -> dict:
    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.job.config import load_config
    from sharded_msam_sf.job.data import Batches, load_corpus
    from sharded_msam_sf.job.engines import build_model
    cfg = load_config(JOB_CONFIG, JOB + ["train.micro_batch_size=16"], world_size=1)
    model = build_model(cfg)
    opt = AdamWMSAMScheduleFree(model.parameters(), **cfg.optimizer_kwargs)
    batches = Batches(load_corpus(cfg), cfg, 0, 1)
    opt.train()
    for step in range(JOB_STEPS):
        (x, y), = batches.micro_batches(step, torch.device("cpu"))
        model(x, y).backward()
        if clip_g0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.move_to_ascent()
        model(x, y).backward()
        opt.move_from_ascent()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_job_two_pass_accumulation_clips_g_under_ddp_and_fsdp2(ranks):
    from sharded_msam_sf.weights_io import load_weights
    out = ranks[1]
    ref = job_reference(CLIP)
    assert _diff(ref, job_reference(0.0)) > 1e-4                 # the clip acts
    assert _diff(ref, job_reference(CLIP, clip_g0=True)) > 1e-5  # and clipping g0 too is another trajectory
    for engine in ("ddp", "fsdp2"):
        sd, _ = load_weights(out / engine / "export")
        d = _diff(sd, ref)
        print(f"MAXDIFF job {engine} two_pass accum2 grad_clip={CLIP} {d:.2e}")
        assert d <= JOB_TOL, (engine, d)
