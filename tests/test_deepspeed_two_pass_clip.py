"""two_pass with gradient clipping under DeepSpeed, on 2 gloo ranks: one rule on every engine
(ALGORITHM.md) — clipping applies to the gradient the update uses; the first gradient g0 is folded
into m **unclipped**. The driver runs the ascent pass through the ZeRO wrapper's ``step()`` (for the
gradient reduction, unscaling and overflow check) with the wrapper's ``clip_grad`` at 0 for that call.

ZeRO-1/2/3 in fp32 against the single-process optimizer on the same global batch that clips only the
second gradient (``reference_run(clip=)``); ZeRO-2/3 bf16 and ZeRO-1 bf16 with the BF16_Optimizer
against the same-precision control; the job's DeepSpeed engine (``train.grad_clip``), which runs the
same driver. Every case clips at every step (max norm 0.05, gradient norms ~1) and also records its
distance from the old rule (g0 clipped too), which the test requires to be far: the cases would fail
on the driver that clipped g0.
"""
import pytest

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 4
TOL = 1e-5
CLIP = 0.05
# name: ds_config kwargs; the reference's precision policy is the config's dtype
CASES = {
    "zero1/fp32": dict(stage=1, dtype="fp32"),
    "zero2/fp32": dict(stage=2, dtype="fp32"),
    "zero3/fp32": dict(stage=3, dtype="fp32", sub_group_size=40),
    "zero2/bf16": dict(stage=2, dtype="bf16"),
    "zero3/bf16": dict(stage=3, dtype="bf16", persistence_threshold=0),
    "zero1/bf16(BF16_Optimizer)": dict(stage=1, dtype="bf16", bf16_optimizer=True),
}


def _clipped_both_reference(steps, dtype):
    """The old DeepSpeed rule, for the could-fail check: g0 clipped too (in move_to_ascent, before the fold)."""
    from unittest import mock

    import torch

    from sharded_msam_sf import AdamWMSAMScheduleFree
    move = AdamWMSAMScheduleFree.move_to_ascent

    def clipped_move(self, *a, **kw):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], CLIP)
        return move(self, *a, **kw)
    with mock.patch.object(AdamWMSAMScheduleFree, "move_to_ascent", clipped_move):
        return S.reference_run(steps, "two_pass", clip=CLIP, dtype=dtype)


def _ranks(rank, world, rec):
    refs = {d: S.reference_run(STEPS, "two_pass", clip=CLIP, dtype=d) for d in ("fp32", "bf16")}
    old = {d: _clipped_both_reference(STEPS, d) for d in ("fp32", "bf16")}
    unclipped = {d: S.reference_run(STEPS, "two_pass", dtype=d) for d in ("fp32", "bf16")}

    def run(name, kw):
        engine, opt = S.make_engine(S.ds_config(sam_mode="two_pass", clip=CLIP, **kw))
        try:
            rec(name, kind=opt.kind, clip_grad=float(engine.optimizer.clip_grad))
            opt.train()
            S.ds_train(engine, opt, STEPS, "two_pass")
            rec(name, grad_norm=float(engine.get_global_grad_norm()), clip_grad_after=float(engine.optimizer.clip_grad),
                k=[g["k"] for g in opt.param_groups])
            opt.eval()
            x = opt.eval_state_dict()
            d = kw["dtype"]
            rec(name, vs_reference=S.max_diff(x, refs[d]), vs_g0_clipped=S.max_diff(x, old[d]),
                vs_unclipped=S.max_diff(x, unclipped[d]), rules_apart=S.max_diff(refs[d], old[d]))
        finally:
            engine.destroy()

    for name, kw in CASES.items():
        rec.case(name, lambda: run(name, kw))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("ds_two_pass_clip"))


@pytest.mark.parametrize("case", list(CASES))
def test_clipping_is_active_and_kept(results, case):
    for r, v in enumerate(S.case_values(results, case)):
        assert v["clip_grad"] == CLIP and v["clip_grad_after"] == CLIP, f"rank {r}: {v}"
        assert v["grad_norm"] > 2 * CLIP, f"rank {r}: the case does not clip (norm {v['grad_norm']})"
        assert v["k"] == [STEPS] * len(v["k"]), f"rank {r}: {v['k']}"


@pytest.mark.parametrize("case", list(CASES))
def test_g0_folded_unclipped_gives_the_reference(results, case):
    tol = TOL if "fp32" in case else S.CONTROL_TOL
    for r, v in enumerate(S.case_values(results, case)):
        assert v["vs_unclipped"] > 1e-4 and v["rules_apart"] > 1e-4, f"rank {r}: the case cannot tell the rules: {v}"
        assert v["vs_reference"] <= tol, f"rank {r}: {v['vs_reference']} from the reference (g0 unclipped): {v}"
