"""HF Trainer on 2 gloo ranks (the rank harness gives each rank a launcher's environment): DeepSpeed
ZeRO-2 and ZeRO-3, both modes, by class (``optimizer_cls_and_kwargs``) and by JSON after
``register()`` (also with ``"no_decay_bias_and_norm": true``: the class route's groups), and plain
DDP: the x the Trainer evaluates and saves equals the single-process reference; one step counter per
engine step; the ascent scale is the same on every rank and every group and (one_pass) equals
−ρ/||m|| over the gathered global m; ``train(resume_from_checkpoint=...)`` ends on the uninterrupted
run's weights; ``optimizers=(opt, None)`` is refused."""
import os

import pytest

pytest.importorskip("transformers")

from tests import ds_scenarios as S  # noqa: E402
from tests import hf_common as H  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
# name: (stage — None: plain DDP —, sam_mode, route); "json-split": the JSON route with no_decay_bias_and_norm
CASES = {"class/zero2/one_pass": (2, "one_pass", "class"), "class/zero3/two_pass": (3, "two_pass", "class"),
         "json/zero2/two_pass": (2, "two_pass", "json"), "json/zero3/one_pass": (3, "one_pass", "json"),
         "json-split/zero2/one_pass": (2, "one_pass", "json-split"),
         "class/ddp/one_pass": (None, "one_pass", "class"), "class/ddp/two_pass": (None, "two_pass", "class")}
# train 4 steps (checkpoints at 2 and 4), then resume a fresh Trainer from checkpoint-2
RESUME_STEPS = 4
RESUME_CASES = {"resume/class/zero2/one_pass": (2, "one_pass", "class"),
                "resume/json/zero2/two_pass": (2, "two_pass", "json"),
                "resume/class/zero3/one_pass": (3, "one_pass", "class"),
                "resume/class/ddp/two_pass": (None, "two_pass", "class")}


def _ds_config(stage, mode, route):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
           "steps_per_print": 10 ** 9}
    if route.startswith("json"):
        cfg["optimizer"] = {"type": "AdamWMSAMScheduleFree",
                            "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.99],
                                       "rho": H.OPT_KW["rho"], "sam_mode": mode, "warmup_steps": 2}}
        if route == "json-split":
            cfg["optimizer"]["params"]["no_decay_bias_and_norm"] = True
    return cfg


def _global_m_norm(facade):
    import torch
    import torch.distributed as dist
    if not hasattr(facade, "_driver"):  # DDP: every rank holds the whole m
        return float(sum(float(facade.state[p]["exp_avg"].pow(2).sum()) for g in facade.param_groups
                         for p in g["params"]) ** 0.5)
    with facade._driver.param_groups_filled():
        sq = sum(float(facade.optimizer.state[p]["exp_avg"].float().pow(2).sum())
                 for g in facade.param_groups for p in g["params"] if "exp_avg" in facade.optimizer.state[p])
    t = torch.tensor([sq], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.sqrt())


def _reset_accelerate():
    """A fresh Accelerate state for the next case (Accelerator(deepspeed_plugin=...) leaves
    ACCELERATE_USE_DEEPSPEED=true in the environment, which would turn the next DDP case into DeepSpeed)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


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

    def train(out, stage, mode, route, steps, resume=None, **kw):
        _reset_accelerate()
        if stage is not None:
            kw["deepspeed"] = _ds_config(stage, mode, route)
        args = H.training_args(out, steps, per_device_train_batch_size=H.N // world,
                               per_device_eval_batch_size=H.N // world, adam_beta2=0.99, **kw)
        opt_kw = {} if route.startswith("json") else {
            "optimizer_cls_and_kwargs": (AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode))}
        if route.startswith("json"):
            register()
        try:
            trainer = MSAMTrainer(model=H.make_model(), args=args, train_dataset=H.dataset(),
                                  eval_dataset=H.dataset(), **opt_kw)
            trainer.train(resume_from_checkpoint=resume)
        finally:
            unregister()
        return trainer

    def close(trainer):
        if hasattr(trainer.model_wrapped, "destroy"):  # a DeepSpeedEngine
            trainer.model_wrapped.destroy()
        gc.collect()

    def case(name, stage, mode, route):
        out = os.path.join(out_root, name.replace("/", "_"))
        trainer = train(out, stage, mode, route, STEPS, save_only_model=True)
        ours = find_optimizer(trainer.optimizer)
        groups = ours.param_groups
        rec(name, facade=type(ours).__name__, k=[g["k"] for g in groups],
            weight_decay=[g["weight_decay"] for g in groups], scales=[g["ascent_scale"] for g in groups],
            expected_scale=-groups[0]["rho"] / _global_m_norm(ours) if mode == "one_pass" else None,
            distributed=str(trainer.accelerator.distributed_type))
        ref = H.reference(STEPS, mode, at=[2, STEPS], one_group=route == "json")
        x = ours.eval_state_dict() if stage is not None else \
            {n: p.detach() for n, p in trainer.model.named_parameters()}  # DDP: x in place after train()
        rec(name, vs_reference=H.max_diff(x, ref[STEPS]))
        metrics = trainer.evaluate()
        rec(name, eval_loss=[metrics["eval_loss"], float(ref[-1]["loss"])])
        trainer.save_model(os.path.join(out, "final"))
        dist.barrier()
        if rank == 0:
            rec(name, checkpoint_vs_reference=H.max_diff(H.saved_weights(os.path.join(out, "checkpoint-2")), ref[2]),
                final_vs_reference=H.max_diff(H.saved_weights(os.path.join(out, "final")), ref[STEPS]))
        close(trainer)

    def resume(name, stage, mode, route):
        out = os.path.join(out_root, name.replace("/", "_"))
        finals = []
        for run, start in (("full", None), ("resumed", os.path.join(out, "full", "checkpoint-2"))):
            trainer = train(os.path.join(out, run), stage, mode, route, RESUME_STEPS, resume=start)
            if start is not None:
                rec(name, k=[g["k"] for g in find_optimizer(trainer.optimizer).param_groups])
            final = os.path.join(out, run, "final")
            trainer.save_model(final)
            finals.append(final)
            close(trainer)
        dist.barrier()
        if rank == 0:
            ref = H.reference(RESUME_STEPS, mode, one_group=route == "json")[RESUME_STEPS]
            full, resumed = (H.saved_weights(f) for f in finals)
            rec(name, resumed_vs_full=H.max_diff(resumed, full), resumed_vs_reference=H.max_diff(resumed, ref),
                resumed_at_2=not os.path.exists(os.path.join(out, "resumed", "checkpoint-2")))

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
    for name, (stage, mode, route) in RESUME_CASES.items():
        rec.case(name, lambda: resume(name, stage, mode, route))
    rec.case("dropped", lambda: dropped("dropped"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_ds")
    return S.run_cases(_ranks, root / "results", str(root / "runs"))


@pytest.mark.parametrize("case", list(CASES))
def test_trained_x_equals_reference(results, case):
    ddp = "/ddp/" in case
    for v in S.case_values(results, case):
        assert v["facade"] == ("AdamWMSAMScheduleFree" if ddp else "DeepSpeedMSAMOptimizer"), v
        assert v["distributed"] == ("DistributedType.MULTI_CPU" if ddp else "DistributedType.DEEPSPEED"), v
        assert v["vs_reference"] < TOL, v


@pytest.mark.parametrize("case", ["class/zero2/one_pass", "json-split/zero2/one_pass", "json/zero2/two_pass"])
def test_json_route_groups(results, case):
    """The class route and the JSON route with no_decay_bias_and_norm give the Trainer's groups (weights
    decayed, biases not); the plain JSON route gives one group, all decayed."""
    expected = [H.WD] if case.startswith("json/") else [H.WD, 0.0]
    for v in S.case_values(results, case):
        assert v["weight_decay"] == expected, v


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_a_checkpoint_is_exact(results, case):
    for v in S.case_values(results, case):
        assert v["k"] == [RESUME_STEPS] * len(v["k"]), v
    v = S.case_values(results, case)[0]
    assert v["resumed_at_2"] and v["resumed_vs_full"] == 0.0 and v["resumed_vs_reference"] < TOL, v


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
