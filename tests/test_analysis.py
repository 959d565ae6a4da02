"""Tests of sharded_msam_sf.analysis against closed forms and single-process runs.

Closed forms: a quadratic L(w) = mean_b (½ wᵀA_b w − c_bᵀw), whose Hessian is the
mean of the A_b with known eigenvalues; its loss along a direction is a parabola
and its SAM sharpness is ρ||g|| + ½ρ² gᵀAg/||g||².

Distributed (2 gloo ranks, one run per layout): every rank computes the single-process
reference on all batches and the DDP / FSDP2 result on its own share; each test compares
one quantity on every rank.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from sharded_msam_sf.analysis import (
    evaluation_weights,
    filter_normalized_direction,
    hessian_vector_product,
    loss_landscape_1d,
    loss_landscape_2d,
    random_direction,
    sam_sharpness,
    top_hessian_eigenvalue,
)

DT = torch.float64


# ---------------------------------------------------------------- quadratic model
class Quadratic(nn.Module):
    """A (2, 3) weight w, loss ½ vec(w)ᵀ A vec(w) − cᵀ vec(w) with A, c per batch."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())


def quad_loss(model, batch):
    A, c = batch
    w = model.w.reshape(-1)
    return 0.5 * w @ A @ w - c @ w


def spd_with_eigenvalues(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ q.T


def quad_problem(eigs=(5.0, 2.0, 1.0, 0.5, 0.25, 0.1), n_batches=3, seed=0):
    """Batches (A_b, c_b) whose mean A has exactly the eigenvalues ``eigs``."""
    g = torch.Generator().manual_seed(seed + 1)
    A = spd_with_eigenvalues(eigs, seed)
    n = len(eigs)
    # A_b = A + N_b with Σ N_b = 0, so the mean Hessian is A.
    noise = [torch.randn(n, n, generator=g, dtype=DT) for _ in range(n_batches - 1)]
    noise = [0.5 * (e + e.T) for e in noise]
    noise.append(-sum(noise))
    batches = [(A + e, torch.randn(n, generator=g, dtype=DT)) for e in noise]
    c = sum(b[1] for b in batches) / n_batches
    model = Quadratic(torch.randn(2, 3, generator=g, dtype=DT))
    return model, batches, A, c


def grad_of_quad(model, A, c):
    return A @ model.w.detach().reshape(-1) - c


def value_of_quad(w, A, c):
    return float(0.5 * w @ A @ w - c @ w)


# ---------------------------------------------------------------- Hessian
def test_top_eigenvalue_of_quadratic_is_known_eigenvalue():
    model, batches, A, _ = quad_problem()
    res = top_hessian_eigenvalue(model, quad_loss, batches, iters=200, tol=1e-10)
    assert res.converged
    assert res.eigenvalue == pytest.approx(5.0, rel=1e-8)
    assert res.residual < 1e-4
    assert len(res.history) == res.iterations
    # Power iteration's Rayleigh quotients increase monotonically towards λ_max for
    # an SPD matrix.
    assert all(b >= a - 1e-12 for a, b in zip(res.history, res.history[1:]))


def test_power_iteration_returns_largest_magnitude_eigenvalue():
    model, batches, _, _ = quad_problem(eigs=(1.0, -3.0, 0.5, 0.2, 0.1, 0.05))
    res = top_hessian_eigenvalue(model, quad_loss, batches, iters=300, tol=1e-12)
    assert res.eigenvalue == pytest.approx(-3.0, rel=1e-8)


def test_power_iteration_reports_non_convergence():
    # λ2/λ1 = 0.99: 3 iterations cannot reach tol 1e-12.
    model, batches, _, _ = quad_problem(eigs=(1.0, 0.99, 0.5, 0.2, 0.1, 0.05))
    res = top_hessian_eigenvalue(model, quad_loss, batches, iters=3, tol=1e-12)
    assert not res.converged
    assert res.iterations == 3
    assert res.eigenvalue < 1.0


def test_hvp_of_quadratic_is_matrix_vector_product():
    model, batches, A, _ = quad_problem()
    v = [torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(3))]
    (hv,) = hessian_vector_product(model, quad_loss, batches, v)
    torch.testing.assert_close(hv.reshape(-1), A @ v[0].reshape(-1), rtol=1e-12, atol=1e-12)


def test_zero_hessian_gives_zero_eigenvalue():
    model = Quadratic(torch.ones(2, 3, dtype=DT))
    batches = [(torch.zeros(6, 6, dtype=DT), torch.ones(6, dtype=DT))]
    res = top_hessian_eigenvalue(model, quad_loss, batches, iters=5)
    assert res.eigenvalue == 0.0 and res.converged


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(3, 9, bias=False)
        self.out = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.squeeze(1)).mean(1)


def test_top_eigenvalue_through_attention_matches_dense_hessian():
    # scaled_dot_product_attention's fused kernels have no double backward; the HVP
    # must still work and equal the dense Hessian's largest-magnitude eigenvalue.
    model = TinyAttention().to(DT)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 5, 3, generator=g, dtype=DT), torch.randint(0, 2, (2,), generator=g))
               for _ in range(2)]
    res = top_hessian_eigenvalue(model, ce_loss, batches, iters=500, tol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        chunks, i = {}, 0
        for n, shp in zip(names, shapes):
            chunks[n] = flat[i:i + shp.numel()].view(shp)
            i += shp.numel()
        return sum(ce_loss(lambda x: torch.func.functional_call(model, chunks, (x,)), b)
                   for b in batches) / len(batches)

    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        dense = torch.autograd.functional.hessian(loss_of, flat0)
    eigs = torch.linalg.eigvalsh(dense)
    top = eigs[eigs.abs().argmax()]
    assert res.eigenvalue == pytest.approx(float(top), rel=1e-6)


# ---------------------------------------------------------------- landscape
def test_landscape_1d_of_quadratic_is_parabola():
    model, batches, A, c = quad_problem()
    d = [torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(5))]
    alphas = [-1.0, -0.3, 0.0, 0.5, 2.0]
    res = loss_landscape_1d(model, quad_loss, batches, alphas=alphas, direction=d)
    w, dv = model.w.detach().reshape(-1), d[0].reshape(-1)
    g = A @ w - c
    f0 = value_of_quad(w, A, c)
    expected = [f0 + a * float(g @ dv) + 0.5 * a * a * float(dv @ A @ dv) for a in alphas]
    assert res.alphas == alphas
    assert res.losses == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_landscape_2d_of_quadratic_is_quadratic_form():
    model, batches, A, c = quad_problem()
    gen = torch.Generator().manual_seed(6)
    d, e = torch.randn(2, 3, dtype=DT, generator=gen), torch.randn(2, 3, dtype=DT, generator=gen)
    alphas, betas = [-0.5, 0.0, 1.0], [-1.0, 0.25]
    res = loss_landscape_2d(model, quad_loss, batches, alphas=alphas, betas=betas, directions=([d], [e]))
    w = model.w.detach().reshape(-1)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            pt = w + a * d.reshape(-1) + b * e.reshape(-1)
            assert res.losses[i][j] == pytest.approx(value_of_quad(pt, A, c), rel=1e-10, abs=1e-12)


def test_landscape_restores_parameters_and_mode_bit_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    res = loss_landscape_1d(model, ce_loss, batches, alphas=[-0.7, 0.3, 1.1])
    sam_sharpness(model, ce_loss, batches, rho=0.5)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert p.grad is None
    assert model.training and model[1].training
    # eval mode was used: with dropout active the repeated α=... values would be random
    again = loss_landscape_1d(model, ce_loss, batches, alphas=[-0.7, 0.3, 1.1])
    assert again.losses == res.losses


def test_filter_normalized_direction_matches_filter_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5))
    d = filter_normalized_direction(model, seed=1)
    for di, p in zip(d, model.parameters()):
        assert di.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(di) == 0
        else:
            dims = tuple(range(1, p.dim()))
            torch.testing.assert_close(torch.linalg.vector_norm(di, dim=dims), torch.linalg.vector_norm(p.detach(), dim=dims))
    d_copy = filter_normalized_direction(model, seed=1, bias_bn="copy")
    for di, p in zip(d_copy, model.parameters()):
        if p.dim() <= 1:
            assert torch.equal(di, p.detach())
    # deterministic in the seed, different across seeds
    assert all(torch.equal(a, b) for a, b in zip(d, filter_normalized_direction(model, seed=1)))
    assert not torch.equal(d[0], filter_normalized_direction(model, seed=2)[0])
    assert not torch.equal(random_direction(model, 0)[0], random_direction(model, 1)[0])


# ---------------------------------------------------------------- sharpness
def test_sam_sharpness_of_quadratic_closed_form():
    model, batches, A, c = quad_problem()
    rho = 0.3
    res = sam_sharpness(model, quad_loss, batches, rho=rho)
    g = grad_of_quad(model, A, c)
    gn = float(g.norm())
    expected = rho * gn + 0.5 * rho ** 2 * float(g @ A @ g) / gn ** 2
    assert res.grad_norm == pytest.approx(gn, rel=1e-12)
    assert res.sharpness == pytest.approx(expected, rel=1e-9)
    assert res.loss == pytest.approx(value_of_quad(model.w.detach().reshape(-1), A, c), rel=1e-12)
    assert res.perturbed_loss - res.loss == pytest.approx(res.sharpness)


def test_sam_sharpness_at_a_minimum_is_bounded_by_curvature():
    # At the minimum g is round-off noise, so g/||g|| is an arbitrary unit vector u
    # and S = ½ρ²·uᵀAu lies between ½ρ²·λ_min and ½ρ²·λ_max.
    A = spd_with_eigenvalues([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    c = torch.arange(6, dtype=DT)
    w_star = torch.linalg.solve(A, c).reshape(2, 3)
    res = sam_sharpness(Quadratic(w_star), quad_loss, [(A, c)], rho=0.1)
    assert res.grad_norm < 1e-12
    assert 0.5 * 0.01 * 1.0 - 1e-12 <= res.sharpness <= 0.5 * 0.01 * 3.0 + 1e-12


def test_sam_sharpness_with_exactly_zero_gradient_is_zero():
    A = spd_with_eigenvalues([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    model = Quadratic(torch.zeros(2, 3, dtype=DT))
    res = sam_sharpness(model, quad_loss, [(A, torch.zeros(6, dtype=DT))], rho=0.1)
    assert res.grad_norm == 0.0 and res.sharpness == 0.0


def test_sam_sharpness_preserves_existing_grads():
    model, batches, _, _ = quad_problem()
    model.w.grad = torch.full_like(model.w, 7.0)
    sam_sharpness(model, quad_loss, batches)
    assert torch.equal(model.w.grad, torch.full_like(model.w, 7.0))


def test_measures_work_inside_no_grad():
    model, batches, A, c = quad_problem()
    expected_h = top_hessian_eigenvalue(model, quad_loss, batches, iters=30, tol=0).eigenvalue
    expected_s = sam_sharpness(model, quad_loss, batches).sharpness
    with torch.no_grad():
        assert top_hessian_eigenvalue(model, quad_loss, batches, iters=30, tol=0).eigenvalue == expected_h
        assert sam_sharpness(model, quad_loss, batches).sharpness == expected_s


# ---------------------------------------------------------------- bad input
def test_bad_arguments_raise_value_error_naming_them():
    model, batches, _, _ = quad_problem()
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(model, quad_loss, batches, iters=0)
    with pytest.raises(ValueError, match="tol"):
        top_hessian_eigenvalue(model, quad_loss, batches, tol=-1.0)
    with pytest.raises(ValueError, match="rho"):
        sam_sharpness(model, quad_loss, batches, rho=-0.1)
    with pytest.raises(ValueError, match="batches"):
        sam_sharpness(model, quad_loss, [])
    with pytest.raises(ValueError, match="alphas"):
        loss_landscape_1d(model, quad_loss, batches, alphas=[])
    with pytest.raises(ValueError, match="bias_bn"):
        loss_landscape_1d(model, quad_loss, batches, bias_bn="keep")
    with pytest.raises(ValueError, match="vector"):
        hessian_vector_product(model, quad_loss, batches, [torch.zeros(3)])
    with pytest.raises(ValueError, match="loss_fn"):
        sam_sharpness(model, lambda m, b: m.w * 2, batches)
    with pytest.raises(ValueError, match="model"):
        sam_sharpness("not a model", quad_loss, batches)
    with pytest.raises(ValueError, match="seed"):
        random_direction(model, seed=1.5)


# ---------------------------------------------------------------- schedule-free eval weights
def test_evaluation_weights_uses_schedulefree_x_and_restores_training():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.1)
    opt.train()
    x_in, y_in = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for _ in range(5):
        nn.functional.cross_entropy(model(x_in), y_in).backward()
        opt.step()
        opt.zero_grad()
    y_weights = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    x_weights = [p.detach().clone() for p in model.parameters()]
    opt.train()
    assert not all(torch.equal(a, b) for a, b in zip(x_weights, y_weights))
    with evaluation_weights(opt):
        for p, x in zip(model.parameters(), x_weights):
            torch.testing.assert_close(p.detach(), x)
    for p, y in zip(model.parameters(), y_weights):
        torch.testing.assert_close(p.detach(), y)
    # already in eval mode: left in eval mode
    opt.eval()
    with evaluation_weights(opt):
        pass
    assert not opt.param_groups[0]["train_mode"]


def test_evaluation_weights_with_msam_one_pass_measures_x_and_returns_to_the_ascent_point():
    from sharded_msam_sf import AdamWMSAMScheduleFree

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.05, rho=0.5, sam_mode="one_pass")
    opt.train()
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    for _ in range(4):
        ce_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    at_ascent = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    x_weights = [p.detach().clone() for p in model.parameters()]
    expected = sam_sharpness(model, ce_loss, [batch]).sharpness
    opt.train()
    with evaluation_weights(opt):
        assert sam_sharpness(model, ce_loss, [batch]).sharpness == pytest.approx(expected, rel=1e-6)
        for p, x in zip(model.parameters(), x_weights):
            torch.testing.assert_close(p.detach(), x)
    for p, a in zip(model.parameters(), at_ascent):
        torch.testing.assert_close(p.detach(), a)


# ---------------------------------------------------------------- distributed
def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(DT)


def _data(n_batches=4):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g))
            for _ in range(n_batches)]


def _measure(model, batches, with_hessian=True):
    out = {}
    if with_hessian:
        h = top_hessian_eigenvalue(model, ce_loss, batches, iters=15, tol=0.0, seed=3)
        out["hessian"] = h.history
    out["l1"] = loss_landscape_1d(model, ce_loss, batches, alphas=[-1.0, -0.2, 0.4, 1.0], seed=4).losses
    out["l2"] = loss_landscape_2d(model, ce_loss, batches, alphas=[-0.5, 0.5], betas=[0.0, 1.0], seed=4).losses
    s = sam_sharpness(model, ce_loss, batches, rho=0.2)
    out["sharp"] = [s.sharpness, s.loss, s.grad_norm]
    return out


def _assert_same(a, b):
    for k in a:
        flat_a = torch.tensor(a[k], dtype=DT).reshape(-1)
        flat_b = torch.tensor(b[k], dtype=DT).reshape(-1)
        torch.testing.assert_close(flat_a, flat_b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def _ranks(rank, world, kind):
    """On every rank: the single-process reference on all batches, and the DDP / FSDP2 measures
    on this rank's share of them (each test below compares one quantity)."""
    batches = _data(2 * world)
    mine = batches[rank::world]
    out = {"reference": _measure(_mlp(), batches, with_hessian=(kind == "ddp"))}
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(_mlp())
        before = [p.detach().clone() for p in model.parameters()]
        out["measured"] = _measure(model, mine)
        out["unchanged"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return out
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = [p.to_local().detach().clone() for p in model.parameters()]
    out["measured"] = _measure(model, mine, with_hessian=False)
    out["unchanged"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
    try:
        top_hessian_eigenvalue(model, ce_loss, mine, iters=2)
        out["hessian_error"] = None
    except NotImplementedError as e:
        out["hessian_error"] = str(e)
    # the model still trains/evaluates after the measurements
    ce_loss(model, mine[0]).backward()
    return out


@pytest.fixture(scope="module")
def distributed():
    """{kind: {rank: measurements}} for DDP and FSDP2 on 2 gloo ranks."""
    from sharded_msam_sf.testing.local_ranks import run_ranks
    return {kind: run_ranks(_ranks, 2, kind, timeout=300) for kind in ("ddp", "fsdp2")}


@pytest.mark.parametrize("kind, quantity", [("ddp", "hessian"), ("ddp", "l1"), ("ddp", "l2"), ("ddp", "sharp"),
                                            ("fsdp2", "l1"), ("fsdp2", "l2"), ("fsdp2", "sharp")])
def test_distributed_equals_single_process(distributed, kind, quantity):
    for rank, r in distributed[kind].items():
        assert set(r["measured"]) == set(r["reference"]), (rank, sorted(r["measured"]), sorted(r["reference"]))
        _assert_same({quantity: r["reference"][quantity]}, {quantity: r["measured"][quantity]})


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_measures_leave_the_parameters_unchanged(distributed, kind):
    for rank, r in distributed[kind].items():
        assert r["unchanged"], rank


def test_fsdp2_hessian_is_refused(distributed):
    for rank, r in distributed["fsdp2"].items():
        err = r["hessian_error"]
        assert err is not None and "FSDP2" in err and "autograd graph" in err, (rank, err)
