"""HF Trainer + DeepSpeed on 2 gloo ranks (the rank harness gives each rank a launcher's
environment), ZeRO-2 and ZeRO-3, both modes, by class (``optimizer_cls_and_kwargs``) and by JSON
after ``register()``: the x the Trainer evaluates and saves equals the single-process reference;
one step counter per engine step; the ascent scale is the same on every rank and every group and
(one_pass) equals −ρ/||m|| over the gathered global m; ``optimizers=(opt, None)`` is refused."""
import os

import pytest

pytest.importorskip("transformers")

from tests import ds_scenarios as S  # noqa: E402
from tests import hf_common as H  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
# name: (stage, sam_mode, route)
CASES = {"class/zero2/one_pass": (2, "one_pass", "class"), "class/zero3/two_pass": (3, "two_pass", "class"),
         "json/zero2/two_pass": (2, "two_pass", "json"), "json/zero3/one_pass": (3, "one_pass", "json")}


def _ds_config(stage, mode, route):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
           "steps_per_print": 10 ** 9}
    if route == "json":
        cfg["optimizer"] = {"type": "AdamWMSAMScheduleFree",
                            "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.99],
                                       "rho": H.OPT_KW["rho"], "sam_mode": mode, "warmup_steps": 2}}
    return cfg


def _global_m_norm(facade):
    import torch
    import torch.distributed as dist
    with facade._driver.param_groups_filled():
        sq = sum(float(facade.optimizer.state[p]["exp_avg"].float().pow(2).sum())
                 for g in facade.param_groups for p in g["params"] if "exp_avg" in facade.optimizer.state[p])
    t = torch.tensor([sq], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.sqrt())


def _reset_accelerate():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerate_on_cpu_ranks():
    """Accelerate runs DeepSpeed only on accelerators: without one it picks no backend and one
    process. On these CPU ranks it is given gloo (what it picks on a GPU is nccl; the rest of its
    DeepSpeed set-up is the same), so that HF + DeepSpeed runs here as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind
    PartialState._prepare_backend = _prepare_backend


def _ranks(rank, world, rec, out_root):
    import gc

    import torch.distributed as dist

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.deepspeed import register, unregister
    from sharded_msam_sf.integrations.hf import MSAMTrainer, ScheduleFreeCallback, find_optimizer

    _accelerate_on_cpu_ranks()

    def case(name, stage, mode, route):
        out = os.path.join(out_root, name.replace("/", "_"))
        _reset_accelerate()
        args = H.training_args(out, STEPS, per_device_train_batch_size=H.N // world,
                               per_device_eval_batch_size=H.N // world, adam_beta2=0.99,
                               deepspeed=_ds_config(stage, mode, route), save_only_model=True)
        kw = {} if route == "json" else {"optimizer_cls_and_kwargs": (AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode))}
        if route == "json":
            register()
        try:
            trainer = MSAMTrainer(model=H.make_model(), args=args, train_dataset=H.dataset(),
                                  eval_dataset=H.dataset(), **kw)
            trainer.train()
        finally:
            unregister()
        facade = find_optimizer(trainer.optimizer)
        groups = facade.param_groups
        rec(name, facade=type(facade).__name__, k=[g["k"] for g in groups],
            scales=[g["ascent_scale"] for g in groups],
            expected_scale=-groups[0]["rho"] / _global_m_norm(facade) if mode == "one_pass" else None)
        ref = H.reference(STEPS, mode, at=[2, STEPS], one_group=route == "json")
        x = facade.eval_state_dict()
        rec(name, vs_reference=H.max_diff(x, ref[STEPS]))
        metrics = trainer.evaluate()
        rec(name, eval_loss=[metrics["eval_loss"], float(ref[-1]["loss"])])
        trainer.save_model(os.path.join(out, "final"))
        dist.barrier()
        if rank == 0:
            rec(name, checkpoint_vs_reference=H.max_diff(H.saved_weights(os.path.join(out, "checkpoint-2")), ref[2]),
                final_vs_reference=H.max_diff(H.saved_weights(os.path.join(out, "final")), ref[STEPS]))
        trainer.model_wrapped.destroy()
        del trainer, facade
        gc.collect()

    def dropped(name):
        _reset_accelerate()
        args = H.training_args(os.path.join(out_root, "dropped"), STEPS, per_device_train_batch_size=H.N // world,
                               deepspeed=_ds_config(2, "one_pass", "class"))
        model = H.make_model()
        try:
            MSAMTrainer(model=model, args=args, train_dataset=H.dataset(),
                        optimizers=(AdamWMSAMScheduleFree(model.parameters(), **H.OPT_KW), None))
            rec(name, raised=None)
        except ValueError as e:
            rec(name, raised=str(e))
        _reset_accelerate()
        try:
            from transformers import Trainer
            Trainer(model=model, args=args, train_dataset=H.dataset(), callbacks=[ScheduleFreeCallback()],
                    optimizers=(AdamWMSAMScheduleFree(model.parameters(), **H.OPT_KW), None))
            rec(name, raised_plain=None)
        except ValueError as e:
            rec(name, raised_plain=str(e))

    for name, (stage, mode, route) in CASES.items():
        rec.case(name, lambda: case(name, stage, mode, route))
    rec.case("dropped", lambda: dropped("dropped"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_ds")
    return S.run_cases(_ranks, root / "results", str(root / "runs"))


@pytest.mark.parametrize("case", list(CASES))
def test_trained_x_equals_reference(results, case):
    for v in S.case_values(results, case):
        assert v["facade"] == "DeepSpeedMSAMOptimizer"
        assert v["vs_reference"] < TOL, v


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_and_saved_files_give_x(results, case):
    values = S.case_values(results, case)
    for v in values:
        assert v["eval_loss"][0] == pytest.approx(v["eval_loss"][1], rel=1e-5), v
    assert values[0]["checkpoint_vs_reference"] < TOL, values[0]
    assert values[0]["final_vs_reference"] < TOL, values[0]


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_counter_per_engine_step(results, case):
    for v in S.case_values(results, case):
        assert v["k"] == [STEPS] * len(v["k"]), v


@pytest.mark.parametrize("case", list(CASES))
def test_ascent_scale_same_everywhere_and_global(results, case):
    values = S.case_values(results, case)
    scales = [v["scales"] for v in values]
    assert all(s == scales[0] for s in scales) and len(set(scales[0])) == 1, scales
    if values[0]["expected_scale"] is not None:
        assert scales[0][0] == pytest.approx(values[0]["expected_scale"], rel=1e-5)


def test_dropped_optimizer_is_refused(results):
    for v in S.case_values(results, "dropped"):
        for key in ("raised", "raised_plain"):
            assert v[key] is not None and "optimizer_cls_and_kwargs" in v[key] and "register()" in v[key], v
