"""The weighted reduction (issue 12's seam): params of different replica counts in one optimizer.

Each piece's local sum of squares is divided by its replica count before the one all-reduce
(``sharded_msam_sf.backends.base``). On one process the "all-reduce" is the identity, so the
norm the optimizer uses must be exactly ``sqrt(Σ_pieces sumsq/replicas)``; a back end that forgot
the weights (or applied them twice) gives another ascent scale, which these tests see."""
import math

import pytest
import torch

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.backends import LOCAL, Backend, Reduction, Share


class PiecesBackend(Backend):
    """One process, pretending the first half of every flat param is held by ``replicas`` ranks."""

    def __init__(self, replicas: int) -> None:
        self.r = replicas
        self.reduction = Reduction(LOCAL, 1, None, weighted=True)

    def replica_pieces(self, p):
        n = p.numel()
        return (((0, n // 2), self.r), ((n // 2, n), 1))


def expected_scale(opt, rho, r):
    sumsq = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            m = opt.state[p]["exp_avg"].view(-1).double()
            n = m.numel()
            sumsq += m[: n // 2].square().sum().item() / r + m[n // 2:].square().sum().item()
    return -rho / math.sqrt(sumsq)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("r", [1, 3])
def test_norm_divides_each_piece_by_its_replicas(impl, r):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300_000 if impl == "fused" else 40)) for _ in range(2)]
    kw = dict(fused=True) if impl == "fused" else dict(foreach=True)
    opt = AdamWMSAMScheduleFree([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.1}],
                                lr=1e-2, rho=0.5, backend=PiecesBackend(r), **kw)
    opt.train()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for group in opt.param_groups:
            assert group["ascent_scale"] == pytest.approx(expected_scale(opt, 0.5, r), rel=1e-6)


def test_param_without_gradient_keeps_its_weighted_momentum():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(6))
    opt = AdamWMSAMScheduleFree([a, b], lr=1e-2, rho=0.5, foreach=True, backend=PiecesBackend(2))
    opt.train()
    a.grad, b.grad = torch.randn(10), torch.randn(6)
    opt.step()
    a.grad, b.grad = torch.randn(10), None   # b keeps its momentum, no gradient this step
    opt.step()
    assert opt.param_groups[0]["ascent_scale"] == pytest.approx(expected_scale(opt, 0.5, 2), rel=1e-6)


def test_reduction_of_mixed_replicas_on_one_rank_set_is_weighted():
    with pytest.raises(ValueError, match="cannot have replicas"):
        Reduction.of([Share(LOCAL, 1), Share(LOCAL, 2)])
    assert Reduction.of([Share(LOCAL, 1), Share(LOCAL, 1)]) == Reduction(LOCAL, 1, None)
