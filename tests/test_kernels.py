"""The kernels package: the scalar layout fails loudly, the shared rules, the dispatch surface."""
from __future__ import annotations

import ast
import inspect
from enum import IntEnum

import pytest
import torch

from sharded_msam_sf import kernels as K
from sharded_msam_sf.kernels import compiled, eager, rules, scalars
from sharded_msam_sf.kernels.scalars import Slot

KW = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, ckp1=0.3, bias_correction2=0.05,
          beta_m=0.8, remove_scale=0.7, apply_scale=-0.4)   # every value distinct: a swapped slot shows


def test_layout_refuses_a_gap_or_an_alias():
    class Gap(IntEnum):
        LR = 0
        EPS = 2

    class Alias(IntEnum):
        LR = 0
        COEF_Y = 1
        NEW = 1   # inserted "in the wrong slot": it aliases COEF_Y

    for bad in (Gap, Alias):
        with pytest.raises(ValueError, match="slots must be numbered"):
            scalars.check_layout(bad)
    scalars.check_layout(Slot)


def test_pack_takes_every_slot_by_name_exactly_once():
    values = scalars.step_scalars(**KW)
    sc = scalars.pack(None, **values)
    s = scalars.unpack(sc)
    for slot in Slot:
        assert sc[slot].item() == values[slot.name.lower()] == getattr(s, slot.name.lower())
    missing = dict(values)
    missing.pop("eps")
    with pytest.raises(ValueError, match=r"missing \['eps'\]"):
        scalars.pack(None, **missing)
    with pytest.raises(ValueError, match=r"unknown \['gamma'\]"):
        scalars.pack(None, gamma=1.0, **values)


def test_a_new_slot_without_a_value_fails_loudly():
    """Insert a field into the layout (here: a copy of Slot with one more member in the middle):
    pack() refuses the old set of values instead of shifting them silently."""
    names = [s.name for s in Slot]
    names.insert(3, "NEW_FIELD")
    Bigger = IntEnum("Bigger", {n: i for i, n in enumerate(names)})
    scalars.check_layout(Bigger)
    with pytest.raises(ValueError, match=r"missing \['new_field'\]"):
        scalars.pack(None, layout=Bigger, **scalars.step_scalars(**KW))


def test_kernels_read_scalars_only_by_name():
    """No bare index into the scalar tensor: the compiled kernels unpack it, the Triton ones
    use the S_<SLOT> constants (one per slot)."""
    from sharded_msam_sf.kernels import triton as TK
    src = inspect.getsource(compiled)
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "sc":
            raise AssertionError(f"compiled.py indexes sc directly: {ast.unparse(node)}")
    tsrc = inspect.getsource(TK)
    assert "sc_ptr + S_" in tsrc
    for node in ast.walk(ast.parse(tsrc)):
        if (isinstance(node, ast.BinOp) and isinstance(node.left, ast.Name) and node.left.id == "sc_ptr"
                and not (isinstance(node.right, ast.Name) and node.right.id.startswith("S_"))):
            raise AssertionError(f"triton.py reads sc_ptr by position: {ast.unparse(node)}")
    if TK.HAVE_TRITON:
        for slot in Slot:
            assert getattr(TK, f"S_{slot.name}").value == int(slot)


@pytest.mark.skipif(not K.compile_available("cpu"), reason="torch.compile unavailable on CPU")
def test_compiled_update_equals_eager_with_distinct_scalars():
    g = torch.Generator().manual_seed(0)
    n = 300
    p, gr, z, m = (torch.randn(n, generator=g) for _ in range(4))
    v = torch.rand(n, generator=g)
    a = [t.clone() for t in (p, gr, z, v, m)]
    b = [t.clone() for t in (p, gr, z, v, m)]
    before = K.compile_counters()["calls"]
    K.sf_adamw_update_([a[0]], [a[1]], [a[2]], [a[3]], [a[4]], impl="fused", **KW)
    assert K.compile_counters()["calls"] == before + 1
    eager.sf_adamw_update_([b[0]], [b[1]], [b[2]], [b[3]], [b[4]], foreach=True, **KW)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 1e-6


@pytest.mark.parametrize("impl", K.IMPLS)
def test_stats_flags_agree_on_every_path(impl):
    """nonfinite for NaN/±inf, v_overflow for a finite g whose square overflows fp32, on every path."""
    if impl in ("fused", "auto") and not K.compile_available("cpu"):
        pytest.skip("torch.compile unavailable on CPU")
    g = torch.Generator().manual_seed(1)
    m, gr = torch.randn(64, generator=g), torch.randn(64, generator=g)
    cases = {"finite": (None, [0.0, 0.0]), "nan": (float("nan"), [1.0, 0.0]), "inf": (float("-inf"), [1.0, 0.0]),
             "huge": (3e19, [0.0, 1.0])}
    for name, (bad, flags) in cases.items():
        gg = gr.clone()
        if bad is not None:
            gg[7] = bad
        for ms in ([m], []):
            out = K.ascent_stats(ms, [gg, torch.zeros(0)], beta_m=0.9 if ms else None, impl=impl) if not ms else \
                K.ascent_stats(ms, [gg], beta_m=0.9, impl=impl)
            assert out.dtype == torch.float64 and out[1:].tolist() == flags, (name, impl, out)
    ref = eager.ascent_stats([m], [gr], beta_m=0.9, foreach=False)[0].item()
    assert K.ascent_stats([m], [gr], beta_m=0.9, impl=impl)[0].item() == pytest.approx(ref, rel=1e-6)


def test_grad_flags_rule():
    f = rules.grad_flags(torch.tensor([1.0, 2.0]))
    assert f.tolist() == [0.0, 0.0]
    assert rules.grad_flags(torch.tensor([1.0, float("nan")])).tolist() == [1.0, 0.0]
    assert rules.grad_flags(torch.tensor([2e19, 1.0])).tolist() == [0.0, 1.0]
    assert rules.grad_flags(torch.tensor([2e19], dtype=torch.float64)).tolist() == [0.0, 0.0]


def test_eager_kernels_require_compute_state():
    """bf16 state must go through bf16_state (the fp32-state precondition, written once)."""
    p, g = torch.zeros(4), torch.ones(4)
    z, v = torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 state goes through"):
        eager.sf_adamw_update_([p], [g], [z], [v], None, foreach=True, **{**KW, "remove_scale": 0.0,
                                                                          "apply_scale": 0.0, "beta_m": None})
    K.sf_adamw_update_([p], [g], [z], [v], None, impl="foreach", **{**KW, "remove_scale": 0.0, "apply_scale": 0.0,
                                                                   "beta_m": None})
    assert v.float().abs().sum() > 0


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match=r"Invalid impl: 'fast'"):
        K.add_scaled_([torch.zeros(2)], [torch.ones(2)], 1.0, impl="fast")


@pytest.mark.parametrize("impl", ["single", "foreach", "auto"])
def test_shift_and_swap_go_through_the_dispatcher(impl, monkeypatch):
    """The optimizer's train/eval swap and ascent shifts use kernels.swap_y_x_/add_scaled_ with
    the group's impl (so foreach=/fused= apply to them too)."""
    from sharded_msam_sf import AdamWMSAMScheduleFree
    seen = []
    for name in ("add_scaled_", "swap_y_x_"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _r=real, _n=name, **kw: (seen.append((_n, kw["impl"])), _r(*a, **kw)))
    kw = {"single": dict(foreach=False), "foreach": dict(foreach=True), "auto": {}}[impl]
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdamWMSAMScheduleFree([w], **kw)
    opt.train()
    for _ in range(2):
        w.grad = torch.ones(4)
        opt.step()
    opt.eval()
    opt.train()
    assert {n for n, _ in seen} == {"add_scaled_", "swap_y_x_"} and {i for _, i in seen} == {impl}


def test_flags_travel_as_one_scalar_through_sum_and_max():
    """The optimizer all-reduces G + 1 values: both gradient flags share the last one."""
    flags = {"clean": [0.0, 0.0], "overflow": [0.0, 1.0], "nonfinite": [1.0, 0.0], "both": [1.0, 1.0]}
    enc = {k: rules.encode_flags(torch.tensor(v, dtype=torch.float64)).item() for k, v in flags.items()}
    expect = {"clean": (False, False), "overflow": (False, True), "nonfinite": (True, False), "both": (True, False)}
    for a in flags:
        for b in flags:
            for reduce in (sum, max):
                got = rules.decode_flag(float(reduce([enc[a], enc[b]])))
                want = (expect[a][0] or expect[b][0], not (expect[a][0] or expect[b][0])
                        and (expect[a][1] or expect[b][1]))
                assert got == want, (a, b, reduce)
