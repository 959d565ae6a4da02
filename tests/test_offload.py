"""ZeRO-Offload (``"offload_optimizer": {"device": "cpu"}``) end to end on 2 gloo ranks.

ZeRO-2 and ZeRO-3, one_pass and two_pass, the usual two param groups (decay / no decay), a
train → eval → train switch mid-run: the fp32 masters and ``engine.module`` equal the
single-process optimizer on the global batch (1e-5); a checkpoint saved after 2 steps and
loaded into an engine built from other weights resumes bit for bit like the uninterrupted run.
DeepSpeed keeps the masters' ``.grad`` buffers across steps under offload (the driver puts them
back as it found them: ``backends/zero.py``), so a second and later steps are the test.
"""
import pytest

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401  (session fixture: build DeepSpeed's shm op once)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS, SAVE_AT, SWITCH = 4, 2, 1
TOL = 1e-5
CASES = {f"zero{stage}/{mode}/offload": (stage, mode) for stage in (2, 3) for mode in ("one_pass", "two_pass")}


def _offload_config(stage, mode):
    cfg = S.ds_config(stage, "fp32", mode)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def _offload_ranks(rank, world, rec, ckpt_dir):
    def run(name, stage, mode):
        tag = name.replace("/", "_")
        ref = S.reference_run(STEPS, mode, switch_at=SWITCH)
        engine, opt = S.make_engine(_offload_config(stage, mode))
        try:
            zero = opt.zero_optimizer
            rec(name, offloaded=bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)),
                groups=len(opt.param_groups))
            opt.train()
            applied = S.ds_train(engine, opt, SAVE_AT, mode, switch_at=SWITCH)
            engine.save_checkpoint(ckpt_dir, tag=tag)
            applied += S.ds_train(engine, opt, STEPS, mode, start=SAVE_AT)
            opt.eval()
            a_masters, a_module = opt.eval_state_dict(), S.module_weights(engine)
            rec(name, applied=applied, k=[g["k"] for g in opt.param_groups],
                masters=S.max_diff(a_masters, ref), module=S.max_diff(a_module, ref))
        finally:
            engine.destroy()
        engine, opt = S.make_engine(_offload_config(stage, mode), seed=123)  # other weights: all from the file
        try:
            opt.train()
            path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
            rec(name, loaded=path is not None, k_loaded=[g["k"] for g in opt.param_groups])
            S.ds_train(engine, opt, STEPS, mode, start=SAVE_AT)
            opt.eval()
            rec(name, resumed_masters=S.max_diff(opt.eval_state_dict(), a_masters),
                resumed_module=S.max_diff(S.module_weights(engine), a_module))
        finally:
            engine.destroy()

    for name, (stage, mode) in CASES.items():
        rec.case(name, lambda: run(name, stage, mode))


@pytest.fixture(scope="module")
def offload_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_offload")
    return S.run_cases(_offload_ranks, root / "results", str(root / "ckpt"))


@pytest.mark.parametrize("case", list(CASES))
def test_offload_is_on_and_every_step_applies(offload_runs, case):
    for r, v in enumerate(S.case_values(offload_runs, case)):
        assert v["offloaded"], f"rank {r}: DeepSpeed did not offload the optimizer: the case tests nothing"
        assert v["groups"] == 2, f"rank {r}: {v['groups']} param groups"
        assert all(v["applied"]) and len(v["applied"]) == STEPS, f"rank {r}: was_step_applied {v['applied']}"
        assert v["k"] == [STEPS, STEPS], f"rank {r}: step counters {v['k']}"


@pytest.mark.parametrize("case", list(CASES))
def test_offload_matches_single_process(offload_runs, case):
    for r, v in enumerate(S.case_values(offload_runs, case)):
        assert v["masters"] <= TOL, f"rank {r}: fp32 masters differ from the single-process optimizer by {v['masters']}"
        assert v["module"] <= TOL, f"rank {r}: engine.module differs from the single-process optimizer by {v['module']}"


@pytest.mark.parametrize("case", list(CASES))
def test_offload_checkpoint_resume_is_exact(offload_runs, case):
    for r, v in enumerate(S.case_values(offload_runs, case)):
        assert v["loaded"] and v["k_loaded"] == [SAVE_AT, SAVE_AT], f"rank {r}: loaded {v['loaded']}, k {v['k_loaded']}"
        assert v["resumed_masters"] == 0.0, f"rank {r}: resumed masters differ by {v['resumed_masters']}"
        assert v["resumed_module"] == 0.0, f"rank {r}: resumed engine.module differs by {v['resumed_module']}"
