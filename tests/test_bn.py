"""sharded_msam_sf.bn.recalibrate: BatchNorm running statistics re-estimated at x.

One process: the statistics equal the exact ones of every batch seen (float64 oracle over the captured
inputs; and BatchNorm's own update with momentum=1 on one batch), validation loss at x improves, the
optimizer's and the modules' modes come back, nothing without running statistics changes, torch's RNG is
untouched, misuse raises. Two DDP ranks (one start-up): each rank's half of the batches gives, combined,
what one process gives on all of them.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.bn import recalibrate, running_stat_modules
from tests import bn_common as B
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")
HP = dict(lr=0.01, warmup_steps=5, betas=(0.95, 0.999))
N_CAL, SIZE = 6, 16
TOL = 1e-5


def trained(mode: str, steps: int = 60):
    model = B.make_model()
    opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    B.train(model, opt, steps=steps)
    return model, opt


def assert_stats(stats, ref, tol=TOL):
    assert set(stats) == set(ref)
    for name, (mean, var) in ref.items():
        m, v = stats[name][0].double(), stats[name][1].double()
        assert torch.allclose(m, mean, atol=tol, rtol=tol), (name, (m - mean).abs().max())
        assert torch.allclose(v, var, atol=tol, rtol=tol), (name, ((v - var).abs() / var).max())


@pytest.fixture(scope="module")
def cases():
    return {mode: trained(mode, steps=60) for mode in MODES}


@pytest.fixture(params=MODES)
def case(request, cases):
    return (request.param,) + cases[request.param]


def test_stats_are_the_exact_statistics_at_x(case):
    mode, model, opt = case
    model = copy.deepcopy(model)
    opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    opt.load_state_dict(case[2].state_dict())
    cal = B.batches(N_CAL, SIZE, seed=5)
    at_y = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert recalibrate(model, cal, N_CAL, optimizer=opt) == 3
    assert all(g["train_mode"] for g in opt.param_groups)  # given in train mode, back in train mode
    for k, p in model.named_parameters():
        assert torch.allclose(p, at_y[k], atol=1e-6), k     # y again (the eval/train round trip)
    stats = B.running(model)
    assert all(nbt == N_CAL for _, _, nbt in stats.values())
    opt.eval()
    assert_stats(stats, B.exact_stats(copy.deepcopy(model), cal))


def test_one_batch_equals_batchnorms_own_update(case):
    """An oracle independent of ours: BatchNorm's own train-mode update with momentum=1 on one batch."""
    mode, model, opt = case
    model = copy.deepcopy(model)
    opt_x = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    opt_x.load_state_dict(opt.state_dict())
    opt_x.eval()
    ref = copy.deepcopy(model)
    big = B.batches(1, 64, seed=6)
    for m in running_stat_modules(ref):
        m.momentum = 1.0
    ref.train()
    with torch.no_grad():
        ref(big[0][0])
    recalibrate(model, big, 1, optimizer=opt_x)
    assert not any(g["train_mode"] for g in opt_x.param_groups)  # given in eval mode, left in eval mode
    assert_stats(B.running(model), {k: (m.double(), v.double()) for k, (m, v, _) in B.running(ref).items()})


def test_validation_loss_improves_at_x(case):
    mode, model, opt = case
    model = copy.deepcopy(model)
    opt_x = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    opt_x.load_state_dict(opt.state_dict())
    opt_x.eval()
    stale = B.val_loss(model)
    recalibrate(model, B.batches(N_CAL, SIZE, seed=5), N_CAL, optimizer=opt_x)
    fresh = B.val_loss(model)
    print(f"VAL {mode}: stale statistics {stale:.4f}, recalibrated at x {fresh:.4f}")
    assert fresh < stale - 0.02, (stale, fresh)


def test_nothing_else_changes_and_modes_restored(case):
    mode, model, opt = case
    model = copy.deepcopy(model)
    opt_x = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    opt_x.load_state_dict(opt.state_dict())
    opt_x.eval()
    model.train()
    model.bn2.eval()  # per-module flags come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*B.data(64, seed=5)), batch_size=16,
                                         shuffle=True)
    recalibrate(model, loader, 3, optimizer=opt_x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.bn2.training and model.bn1.training
    after = model.state_dict()
    stats = {f"{n}.{b}" for n in ("bn1", "bn2", "bn3") for b in ("running_mean", "running_var", "num_batches_tracked")}
    for k, v in before.items():
        if k in stats:
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # params (x, bitwise), LayerNorm, the untracked BatchNorm


def test_misuse_is_refused():
    model, opt = B.make_model(), None
    cal = B.batches(2, 8, seed=5)
    with pytest.raises(TypeError, match="optimizer=None if the model already holds x"):
        recalibrate(model, cal, 2)
    with pytest.raises(TypeError, match="not a schedule-free optimizer"):
        recalibrate(model, cal, 2, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
        recalibrate(model, cal, 0, optimizer=opt)
    inst = torch.nn.Sequential(torch.nn.InstanceNorm1d(3, track_running_stats=True))
    with pytest.raises(ValueError, match="InstanceNorm"):
        recalibrate(inst, [torch.randn(2, 3, 4)], 1, optimizer=None)
    assert recalibrate(torch.nn.Linear(2, 2), [torch.randn(2, 2)], 1, optimizer=None) == 0
    unreached = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "bn": torch.nn.BatchNorm1d(2)})
    with pytest.raises(RuntimeError, match="fewer than 2 values"):
        recalibrate(unreached, [torch.randn(2, 2)], 1, optimizer=None, forward=lambda m, b: m["used"](b))


# ---------------------------------------------------------------------- two DDP ranks
def _ddp_rank(rank, world_size, states):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for mode, state in states.items():
        model = B.make_model()
        model.load_state_dict(state["model"])
        opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
        opt.load_state_dict(state["opt"])
        ddp = DDP(model)
        mine = B.batches(2 * N_CAL, SIZE // 2, seed=7)[rank::world_size]   # each rank its own half-size batches
        assert recalibrate(ddp, mine, N_CAL, optimizer=opt) == 3
        assert all(g["train_mode"] for g in opt.param_groups)
        out[mode] = {k: (m.tolist(), v.tolist(), n) for k, (m, v, n) in B.running(model).items()}
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ddp_runs(cases):
    states = {mode: {"model": m.state_dict(), "opt": o.state_dict()} for mode, (m, o) in cases.items()}
    return run_ranks(_ddp_rank, 2, states, timeout=240)


def test_two_ranks_equal_one_process(case, ddp_runs):
    """Rank r recalibrates on batches r, r+2, ... (half size); one process on all of them in that order."""
    mode, model, opt = case
    one = copy.deepcopy(model)
    opt1 = AdamWMSAMScheduleFree(one.parameters(), sam_mode=mode, **HP)
    opt1.load_state_dict(opt.state_dict())
    all_batches = B.batches(2 * N_CAL, SIZE // 2, seed=7)
    recalibrate(one, all_batches, 2 * N_CAL, optimizer=opt1)
    ref = B.running(one)
    for rank, runs in ddp_runs.items():
        stats = {k: (torch.tensor(m), torch.tensor(v), n) for k, (m, v, n) in runs[mode].items()}
        for name, (mean, var, nbt) in ref.items():
            assert torch.allclose(stats[name][0], mean, atol=TOL, rtol=TOL), (rank, name)
            assert torch.allclose(stats[name][1], var, atol=TOL, rtol=TOL), (rank, name)
            assert stats[name][2] == nbt == 2 * N_CAL, (rank, name, stats[name][2])
    opt1.eval()
    assert_stats({k: (torch.tensor(m), torch.tensor(v)) for k, (m, v, _) in ddp_runs[0][mode].items()},
                 B.exact_stats(copy.deepcopy(one), all_batches))
