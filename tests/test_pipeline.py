"""Pipeline parallelism (``torch.distributed.pipelining``, 4 gloo ranks, one optimizer per stage with
``pipeline_group=``): equal to the single-process trajectory (GPipe and 1F1B, both modes, two param
groups, a param without gradients, NaN skips, eval()/train() mid-run), alone and with DDP or FSDP2
data parallelism on each stage; one all-reduce per gradient evaluation; and the measurements
fail when the stages are not summed or a replica is counted twice.

One multi-process run (the ``runs`` fixture, layouts in :mod:`tests.pipeline_common`) measures
everything; each test asserts one behaviour on every rank's measurements.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch.distributed as dist

from sharded_msam_sf.backends import Backend, Reduction, Share
from tests import pipeline_common as P
from tests import sharded_common as C
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")
CASES = (("pp", "gpipe"), ("pp", "1f1b"), ("pp_ddp", "gpipe"), ("pp_fsdp2", "1f1b"))


class ReplicasAsShards(Backend):
    """A wrong inner back end: it declares the DDP replicas disjoint shards (Share(dp group, 1)),
    so each replica's sum of squares is counted once per dp rank."""

    def __init__(self, dp_group) -> None:
        self.reduction = Reduction(dp_group, 1)
        self._share = Share(dp_group, 1)

    def share(self, p):
        return self._share


def _closure_two_pass(mesh, steps: int = 3) -> float:
    """two_pass through ``step(closure)``: the closure runs the schedule (zero_grad, closure at y,
    move_to_ascent, closure, move_from_ascent, update); max |diff| against the control."""
    base = P.make_full()
    ref = copy.deepcopy(base)
    pipe = P.Pipeline(mesh, "pp", "1f1b", base)
    groups, _ = C.param_groups("pp", pipe.part, ref)
    opt = C.AdamWMSAMScheduleFree(groups, sam_mode="two_pass", pipeline_group=mesh.pp_group, **C.HP)
    opt.train()
    for i in range(steps):
        x, y = C.global_batch(i)
        opt.step(lambda: pipe.backward(x, y))
    opt.eval()
    C.reference_run("pp", pipe.part, ref, mode="two_pass", steps=steps)
    return C.max_abs_diff(C.full_weights(pipe.part), {k: v.float() for k, v in ref[mesh.pp].state_dict().items()})


def _first_step_error(mesh, layout: str, kwargs, at_construction: bool = False):
    """The error of building the optimizer for ``layout``'s stage with ``kwargs(pipe)`` and taking one step."""
    pipe = P.Pipeline(mesh, layout, "gpipe", P.make_full())
    try:
        opt = C.AdamWMSAMScheduleFree(pipe.part.parameters(), **C.HP, **kwargs(pipe))
        if at_construction:
            return None
        opt.train()
        x, y = C.global_batch(0)
        pipe.backward(x, y)
        opt.step()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _errors(mesh) -> dict:
    me = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    from sharded_msam_sf.backends import DDPBackend
    alone = DDPBackend(singles[me])   # an inner group of one rank per stage: 2 ranks in all, not the world
    return dict(
        no_pipeline_group=_first_step_error(mesh, "pp", lambda pipe: {}),
        wrong_pipeline_group=_first_step_error(mesh, "pp", lambda pipe: dict(pipeline_group=mesh.dp_group)),
        world_as_pipeline_group=_first_step_error(
            mesh, "pp_ddp", lambda pipe: dict(pipeline_group=dist.group.WORLD, model=pipe.module), True),
        not_a_group=_first_step_error(mesh, "pp", lambda pipe: dict(pipeline_group="pp"), True),
        union_not_world=_first_step_error(
            mesh, "pp", lambda pipe: dict(pipeline_group=mesh.pp_group, backend=alone), True),
        union_given=_first_step_error(
            mesh, "pp", lambda pipe: dict(pipeline_group=mesh.pp_group, backend=alone, process_group=mesh.pp_group)),
    )


def _ranks(rank, world_size):
    from sharded_msam_sf.backends import LocalBackend, PipelineBackend
    mesh = P.Mesh()
    out = {(layout, sched, mode): P.measure(mesh, layout, sched, mode) for layout, sched in CASES for mode in MODES}
    # no NaN written after DDP's all-reduce here: without model= the dp replicas do not exchange the flag
    out["ddp_without_model"] = P.measure(mesh, "pp_ddp", "1f1b", "one_pass", nan_at=None,
                                         opt_kwargs=lambda pipe: dict(pipeline_group=mesh.pp_group))
    out["uneven_groups"] = P.measure(mesh, "pp_fsdp2", "gpipe", "one_pass", regroup=P.rho_free_first_and_uneven)
    out["not_summed"] = P.measure(mesh, "pp", "gpipe", "one_pass", opt_kwargs=lambda pipe: dict(backend=LocalBackend()))
    out["counted_twice"] = P.measure(mesh, "pp_ddp", "gpipe", "one_pass", opt_kwargs=lambda pipe: dict(
        backend=PipelineBackend(ReplicasAsShards(mesh.dp_group), mesh.pp_group)))
    out["collectives"] = {layout: P.collectives(mesh, layout, sched) for layout, sched in CASES[1:]}
    out["closure_two_pass"] = _closure_two_pass(mesh)
    out["errors"] = _errors(mesh)
    out["mesh"] = dict(pp=mesh.pp, dp=mesh.dp, pp_ranks=dist.get_process_group_ranks(mesh.pp_group))
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 4, timeout=600)


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_equals_single_process(runs, case, mode, check):
    C.assert_on_every_rank(runs, case + (mode,), C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {'-'.join(case)} {mode} {max(runs[r][case + (mode,)]['diff'] for r in runs):.3e}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_ascent_scale_is_the_same_on_every_rank(runs, case, mode):
    # one -rho/||m|| (one_pass) or +rho/||m|| (two_pass) for the whole model, on every stage and dp rank
    scales = [runs[r][case + (mode,)]["scales"] for r in sorted(runs)]
    assert all(s == scales[0] for s in scales), scales


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_reduction_spans_the_stages_and_the_data_parallel_ranks(runs, case):
    # pp: each pipeline's own ranks; pp x DDP (model=) and pp x FSDP2: the whole world, weighted
    for r in runs:
        rep = runs[r][case + ("one_pass",)]["backend"]
        want = runs[r]["mesh"]["pp_ranks"] if case[0] == "pp" else [0, 1, 2, 3]
        assert rep.startswith(f"PipelineBackend(group_ranks={want}, replicas=per parameter"), rep
        inner = {"pp": "LocalBackend()", "pp_ddp": "DDPBackend(", "pp_fsdp2": "FSDP2Backend("}[case[0]]
        assert f"inner={inner}" in rep, rep


def test_ddp_stage_without_model_reduces_over_the_pipeline_only(runs):
    # DDP replicas agree without communication: the stats add up over the pipeline group alone
    C.assert_on_every_rank(runs, "ddp_without_model", C.EQUIVALENCE_CHECKS["final_weights"])
    C.assert_on_every_rank(runs, "ddp_without_model", C.EQUIVALENCE_CHECKS["ascent_scales"])
    for r in runs:
        assert runs[r]["ddp_without_model"]["backend"].startswith(
            f"PipelineBackend(group_ranks={runs[r]['mesh']['pp_ranks']},")


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
def test_stages_with_different_param_groups(runs, check):
    # stage 0 has 3 param groups, stage 1 has 2, the first without the ascent (rho = 0): the one
    # all-reduce carries [Σ sumsq, flag] whatever the groups, and the norm is over the rho > 0 groups
    assert sorted({runs[r]["uneven_groups"]["n_groups"] for r in runs}) == [2, 3]
    C.assert_on_every_rank(runs, "uneven_groups", C.EQUIVALENCE_CHECKS[check])


def test_param_without_gradient_gets_no_state(runs):
    for r in runs:
        for case in CASES:
            assert runs[r][case + ("one_pass",)]["spare_state"] == [], (r, case)


@pytest.mark.parametrize("what", ["not_summed", "counted_twice"])
def test_the_checks_fail_when_stages_are_not_summed_or_replicas_counted_twice(runs, what):
    # not_summed: one optimizer per stage reducing over its own stage (backend=LocalBackend(), no
    # pipeline_group); counted_twice: DDP replicas declared as disjoint shards. Both give another
    # norm, so the ascent scales and the weights differ from the control: the checks above would fail.
    for check in ("global_norm", "ascent_scales", "final_weights"):
        if what == "not_summed" and check == "global_norm":
            continue   # its "global" norm is the stage's own, not comparable
        failed = []
        for r in runs:
            try:
                C.EQUIVALENCE_CHECKS[check](runs[r][what])
            except AssertionError:
                failed.append(r)
        assert failed, f"{what}: {check} passed on every rank"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [c[0] for c in CASES[1:]])
def test_one_all_reduce_per_gradient_evaluation(runs, layout, mode):
    # one_pass: 1 all-reduce of [Σ sumsq, flag] per step, two_pass: 2; nothing in train()/eval()
    for r in runs:
        C.check_collectives(runs[r]["collectives"][layout][mode], per_step=1 if mode == "one_pass" else 2)


def test_two_pass_through_step_closure(runs):
    for r in runs:
        assert runs[r]["closure_two_pass"] <= C.TOL, (r, runs[r]["closure_two_pass"])


@pytest.mark.parametrize("case,match", [
    ("no_pipeline_group", "pipeline stage .* pipeline_group= was not given"),
    ("wrong_pipeline_group", "Invalid pipeline_group: ranks .* pass that stage's group"),
    ("world_as_pipeline_group", "Invalid pipeline_group: ranks .* both pipeline peers"),
    ("not_a_group", "TypeError: Invalid pipeline_group: expected a torch.distributed.ProcessGroup"),
    ("union_not_world", "make 2 ranks, not the world .*pass process_group="),
])
def test_wrong_setups_raise(runs, case, match):
    for r in runs:
        err = runs[r]["errors"][case]
        assert err is not None and re.search(match, err), (r, err)


def test_process_group_names_the_union(runs):
    for r in runs:
        assert runs[r]["errors"]["union_given"] is None, runs[r]["errors"]["union_given"]
