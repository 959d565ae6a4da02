"""DDP (2 gloo ranks): the local back end is exact for replicas (no collective of ours),
and ``model=ddp`` adds one all-reduce per gradient evaluation so that a NaN made after
DDP's all-reduce still skips the step everywhere.

One multi-process run (the ``runs`` fixture) measures every scenario; each test asserts
one behaviour of one scenario on every rank's measurements.
"""
from __future__ import annotations

import pytest

from tests import sharded_common as C
from tests.harness import run_ranks

MODES = ("one_pass", "two_pass")
# name -> (model= passed, NaN source): without model= a NaN must travel through DDP's own
# gradient all-reduce (in the data); with model= a NaN written after it is also caught
SCENARIOS = {"ddp": dict(pass_model=False, nan_via_data=True), "ddp_model_arg": dict(pass_model=True)}


def _ranks(rank, world_size):
    from sharded_msam_sf.backends import DDPBackend, LocalBackend
    out = {}
    for name, kw in SCENARIOS.items():
        for mode in MODES:
            out[(name, mode)] = C.measure_equivalence("ddp", mode, rank, world_size, **kw)
        out[("collectives", name)] = C.measure_collectives("ddp", rank, world_size, pass_model=kw["pass_model"])
    model = C.wrap("ddp", C.make_model())
    out["backend"] = (type(C.AdamWMSAMScheduleFree(model.parameters()).backend) is LocalBackend,
                      type(C.AdamWMSAMScheduleFree(model.parameters(), model=model).backend) is DDPBackend)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_ranks, 2, timeout=300)


@pytest.mark.parametrize("check", C.EQUIVALENCE_CHECKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_equals_single_process(runs, scenario, mode, check):
    C.assert_on_every_rank(runs, (scenario, mode), C.EQUIVALENCE_CHECKS[check])
    if check == "final_weights":
        print(f"MAXDIFF {scenario} {mode} {runs[0][(scenario, mode)]['diff']:.3e}")


def test_backend_choice(runs):
    """ddp.parameters() alone: LocalBackend; model=ddp: DDPBackend."""
    for rank, r in runs.items():
        assert r["backend"] == (True, True), (rank, r["backend"])


@pytest.mark.parametrize("mode", MODES)
def test_local_backend_adds_no_collective(runs, mode):
    C.assert_on_every_rank(runs, ("collectives", "ddp"), lambda m: C.check_collectives(m[mode], per_step=0))


@pytest.mark.parametrize("mode", MODES)
def test_model_argument_adds_one_all_reduce_per_gradient(runs, mode):
    per_step = {"one_pass": 1, "two_pass": 2}[mode]
    C.assert_on_every_rank(runs, ("collectives", "ddp_model_arg"),
                           lambda m: C.check_collectives(m[mode], per_step=per_step))
