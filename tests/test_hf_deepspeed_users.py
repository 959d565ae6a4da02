"""HF Trainer + DeepSpeed the way users run it, on 2 gloo ranks (one start-up for every case):

- **from_pretrained under ZeRO-3**: ``TrainingArguments(deepspeed=<ZeRO-3 config>)`` made first (an active
  ``HfDeepSpeedConfig``), then a tiny transformers ``PreTrainedModel`` saved with ``save_pretrained`` from a config and loaded with
  ``from_pretrained``, which builds it inside ``deepspeed.zero.Init`` (asserted: its params carry ``ds_id``
  before the Trainer exists). Plain ``Trainer`` + :class:`ScheduleFreeCallback` (one_pass),
  :class:`MSAMTrainer` (two_pass) by class (``optimizer_cls_and_kwargs``), and the JSON route after
  ``register()`` (two_pass): x (``eval_state_dict``, ``save_model``'s file, ``evaluate()``'s loss)
  equals the single-process reference (the same ``from_pretrained`` without DeepSpeed, the Trainer's
  weight-decay groups or, JSON, one group), k = steps, one ascent scale on every rank and group.
- **two_pass with clipping** (``max_grad_norm``, DeepSpeed's ``gradient_clipping: "auto"``): ZeRO-2 gives the reference that clips the second gradient only (g0 folded unclipped, ALGORITHM.md).
- **ZeRO-Offload by class** (``offload_optimizer: cpu``): without ``zero_force_ds_cpu_optimizer: false``
  Accelerate would swap ours for DeepSpeedCPUAdam: MSAMTrainer refuses before that, naming the setting;
  with it, two_pass trains to the reference.
"""
import os

import pytest

pytest.importorskip("transformers")

from tests import ds_scenarios as S  # noqa: E402
from tests import hf_common as H  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS = 3
TOL = 1e-5
CLIP = 0.05
# name: (trainer — "callback": Trainer + ScheduleFreeCallback, "msam": MSAMTrainer —, sam_mode, route)
PRETRAINED_CASES = {"pretrained/zero3/callback/one_pass/class": ("callback", "one_pass", "class"),
                    "pretrained/zero3/msam/two_pass/class": ("msam", "two_pass", "class"),
                    "pretrained/zero3/msam/two_pass/json": ("msam", "two_pass", "json")}
# name: (stage, sam_mode); the tiny HFNet of hf_common, MSAMTrainer by class
# (ZeRO-1/2/3 and bf16 with clipping: tests/test_deepspeed_two_pass_clip.py; one_pass offload: test_offload.py)
CLIP_CASES = {"clip/zero2/two_pass": (2, "two_pass")}
OFFLOAD_CASES = {"offload/zero2/two_pass": "two_pass"}


# ---------------------------------------------------------------------- the tiny pretrained model
def _pretrained_classes():
    """A transformers ``PreTrainedModel`` with hf_common's HFNet inside (``forward(x, labels)`` returns
    the mean loss), made once per process: ``from_pretrained`` is transformers' own, ZeRO-3 included."""
    global _CLASSES
    try:
        return _CLASSES
    except NameError:
        pass
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    class TinyConfig(PretrainedConfig):
        model_type = "tiny_msam"

        def __init__(self, n_in=H.IN, n_hidden=H.HID, n_out=H.OUT, **kw):
            self.n_in, self.n_hidden, self.n_out = n_in, n_hidden, n_out
            super().__init__(**kw)

    class TinyModel(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.fc1 = torch.nn.Linear(config.n_in, config.n_hidden)
            self.fc2 = torch.nn.Linear(config.n_hidden, config.n_out)
            self.post_init()

        def _init_weights(self, module):  # the weights come from the saved file
            pass

        def forward(self, x, labels=None):
            logits = self.fc2(torch.tanh(self.fc1(x)))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = torch.nn.functional.mse_loss(logits.float(), labels)
            return out

    _CLASSES = TinyConfig, TinyModel
    return _CLASSES


def _save_pretrained(path):
    """``save_pretrained`` of a model built from a config (hf_common's initial weights)."""
    import torch
    config_cls, model_cls = _pretrained_classes()
    model = model_cls(config_cls())
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), H.make_model().named_parameters()):
            p.copy_(q)
    model.save_pretrained(path)


def _from_pretrained(path):
    return _pretrained_classes()[1].from_pretrained(path)


def _hf_net_data():
    return H.dataset()


def _reference(make, data, steps, sam_mode, *, groups, clip=0.0):
    """The single-process optimizer on the full batch (every step sees all of ``data``): x after
    ``steps`` steps (named params, fp32) and the eval loss there. ``groups``: "trainer" (the Trainer's
    weight-decay split, by ``Trainer.get_decay_parameter_names``) or "one" (every param decayed);
    ``clip``: max norm of the gradient the update uses (two_pass: the second; g0 unclipped)."""
    import torch
    from transformers import Trainer
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from sharded_msam_sf import AdamWMSAMScheduleFree
    unset_hf_deepspeed_config()  # (an earlier case's TrainingArguments may still be alive)
    assert not is_deepspeed_zero3_enabled()
    model = make()
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if groups == "one":
        pg = [{"params": [p for _, p in params], "weight_decay": H.WD}]
    else:
        decay = set(Trainer.get_decay_parameter_names(None, model))
        pg = [{"params": [p for n, p in params if n in decay], "weight_decay": H.WD},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    opt = AdamWMSAMScheduleFree(pg, sam_mode=sam_mode, **H.OPT_KW)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}

    def loss():
        return model(**batch)["loss"]
    opt.train()
    for _ in range(steps):
        loss().backward()
        if sam_mode == "two_pass":
            opt.move_to_ascent()
            loss().backward()
            opt.move_from_ascent()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.eval()
    with torch.no_grad():
        eval_loss = float(loss())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, eval_loss


def _ds_config(stage, mode, route, **zero):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True, **zero},
           "steps_per_print": 10 ** 9}
    if route == "json":
        cfg["optimizer"] = {"type": "AdamWMSAMScheduleFree",
                            "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.99],
                                       "rho": H.OPT_KW["rho"], "sam_mode": mode, "warmup_steps": 2}}
    return cfg


def _ranks(rank, world, rec, out_root):
    import gc

    import torch
    import torch.distributed as dist

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.deepspeed import register, unregister
    from sharded_msam_sf.integrations.hf import MSAMTrainer, ScheduleFreeCallback, find_optimizer
    from tests.test_hf_deepspeed import _accelerate_on_cpu_ranks, _global_m_norm, _reset_accelerate

    _accelerate_on_cpu_ranks()
    pretrained = os.path.join(out_root, "tiny-pretrained")
    if rank == 0:
        _save_pretrained(pretrained)
    dist.barrier()

    def close(trainer):
        if hasattr(trainer.model_wrapped, "destroy"):
            trainer.model_wrapped.destroy()
        gc.collect()

    def run(name, out, args, make_model, data, trainer_kind, mode, route, ref):
        """Build the Trainer, train, and record x, k, the scales, evaluate() and save_model()."""
        from transformers import Trainer
        opt_kw = {} if route == "json" else {
            "optimizer_cls_and_kwargs": (AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode))}
        if route == "json":
            register()
        try:
            model = make_model()
            rec(name, ds_id=all(hasattr(p, "ds_id") for p in model.parameters()))
            cls, extra = (MSAMTrainer, {}) if trainer_kind == "msam" else (Trainer, {"callbacks": [ScheduleFreeCallback()]})
            trainer = cls(model=model, args=args, train_dataset=data, eval_dataset=data, **opt_kw, **extra)
            trainer.train()
        finally:
            unregister()
        try:
            ours = find_optimizer(trainer.optimizer)
            groups = ours.param_groups
            rec(name, facade=type(ours).__name__, k=[g["k"] for g in groups],
                scales=[g["ascent_scale"] for g in groups],
                expected_scale=-groups[0]["rho"] / _global_m_norm(ours) if mode == "one_pass" else None,
                kind=ours.kind)
            x = ours.eval_state_dict()
            rec(name, vs_reference=H.max_diff(x, ref[0]))
            metrics = trainer.evaluate()
            rec(name, eval_loss=[metrics["eval_loss"], ref[1]])
            trainer.save_model(os.path.join(out, "final"))
            dist.barrier()
            if rank == 0:
                saved = H.saved_weights(os.path.join(out, "final"))
                rec(name, saved_vs_reference=H.max_diff(saved, {k: ref[0][k] for k in saved}),
                    saved_keys=len(saved))
        finally:
            close(trainer)

    def pretrained_case(name, trainer_kind, mode, route):
        _reset_accelerate()
        out = os.path.join(out_root, name.replace("/", "_"))
        ref = _reference(lambda: _from_pretrained(pretrained), _hf_net_data(), STEPS, mode,
                         groups="one" if route == "json" else "trainer")
        # HF's ZeRO-3 recipe: the TrainingArguments (with the DeepSpeed config) first, then from_pretrained
        args = H.training_args(out, STEPS, per_device_train_batch_size=H.N // world,
                               per_device_eval_batch_size=H.N // world, adam_beta2=0.99, save_strategy="no",
                               deepspeed=_ds_config(3, mode, route))
        run(name, out, args, lambda: _from_pretrained(pretrained), _hf_net_data(), trainer_kind, mode, route, ref)

    def clip_case(name, stage, mode):
        _reset_accelerate()
        out = os.path.join(out_root, name.replace("/", "_"))
        ref = _reference(H.make_model, _hf_net_data(), STEPS, mode, groups="trainer", clip=CLIP)
        unclipped = _reference(H.make_model, _hf_net_data(), STEPS, mode, groups="trainer")
        args = H.training_args(out, STEPS, per_device_train_batch_size=H.N // world,
                               per_device_eval_batch_size=H.N // world, adam_beta2=0.99, save_strategy="no",
                               max_grad_norm=CLIP, deepspeed=_ds_config(stage, mode, "class"))
        rec(name, clip_moves_reference=H.max_diff(ref[0], unclipped[0]))
        run(name, out, args, H.make_model, _hf_net_data(), "msam", mode, "class", ref)

    def offload_case(name, mode):
        _reset_accelerate()
        out = os.path.join(out_root, name.replace("/", "_"))
        kw = dict(per_device_train_batch_size=H.N // world, per_device_eval_batch_size=H.N // world,
                  adam_beta2=0.99, save_strategy="no")
        offload = {"offload_optimizer": {"device": "cpu"}}
        ref = _reference(H.make_model, _hf_net_data(), STEPS, mode, groups="trainer")
        args = H.training_args(out, STEPS, deepspeed=_ds_config(2, mode, "class", **offload), **kw)
        try:  # as users write it: refused before Accelerate swaps in DeepSpeedCPUAdam
            MSAMTrainer(model=H.make_model(), args=args, train_dataset=H.dataset(),
                        optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode))).train()
            rec(name, refused=None)
        except ValueError as e:
            rec(name, refused=str(e))
        _reset_accelerate()
        cfg = dict(_ds_config(2, mode, "class", **offload), zero_force_ds_cpu_optimizer=False)
        args = H.training_args(out, STEPS, deepspeed=cfg, **kw)
        run(name, out, args, H.make_model, _hf_net_data(), "msam", mode, "class", ref)

    for name, (trainer_kind, mode, route) in PRETRAINED_CASES.items():
        rec.case(name, lambda: pretrained_case(name, trainer_kind, mode, route))
    for name, (stage, mode) in CLIP_CASES.items():
        rec.case(name, lambda: clip_case(name, stage, mode))
    for name, mode in OFFLOAD_CASES.items():
        rec.case(name, lambda: offload_case(name, mode))
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_ds_users")
    return S.run_cases(_ranks, root / "results", str(root / "runs"), timeout=900)


ALL = list(PRETRAINED_CASES) + list(CLIP_CASES) + list(OFFLOAD_CASES)


@pytest.mark.parametrize("case", list(PRETRAINED_CASES))
def test_from_pretrained_builds_inside_zero_init(results, case):
    for v in S.case_values(results, case):
        assert v["ds_id"] and v["kind"] == "zero3", v


@pytest.mark.parametrize("case", ALL)
def test_trained_x_equals_reference(results, case):
    for v in S.case_values(results, case):
        assert v["facade"] == "DeepSpeedMSAMOptimizer", v
        assert v["vs_reference"] < TOL, v


@pytest.mark.parametrize("case", ALL)
def test_evaluate_and_saved_model_give_x(results, case):
    values = S.case_values(results, case)
    for v in values:
        assert v["eval_loss"][0] == pytest.approx(v["eval_loss"][1], rel=1e-5), v
    assert values[0]["saved_keys"] > 0 and values[0]["saved_vs_reference"] < TOL, values[0]


@pytest.mark.parametrize("case", ALL)
def test_one_step_counter_and_one_global_ascent_scale(results, case):
    values = S.case_values(results, case)
    scales = [v["scales"] for v in values]
    assert all(v["k"] == [STEPS] * len(v["k"]) for v in values), values
    assert all(s == scales[0] for s in scales) and len(set(scales[0])) == 1, scales
    if values[0]["expected_scale"] is not None:
        assert scales[0][0] == pytest.approx(values[0]["expected_scale"], rel=1e-5)


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clipping_is_active(results, case):
    for v in S.case_values(results, case):
        assert v["clip_moves_reference"] > 1e-4, v


@pytest.mark.parametrize("case", list(OFFLOAD_CASES))
def test_offload_without_the_setting_is_refused_naming_it(results, case):
    for v in S.case_values(results, case):
        assert v["refused"] is not None and '"zero_force_ds_cpu_optimizer": false' in v["refused"], v
        assert "DeepSpeedCPUAdam" in v["refused"], v


def test_callback_names_the_setting_for_a_swapped_optimizer():
    """Plain Trainer + ScheduleFreeCallback: Accelerate has already swapped in DeepSpeed's CPU Adam when
    the callback sees the optimizer; the refusal names the setting. (The swap itself builds DeepSpeed's
    cpu_adam C++ op, a long JIT build on these machines: the callback gets an instance made without it.)"""
    import types

    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback
    swapped = types.SimpleNamespace(optimizer=DeepSpeedCPUAdam.__new__(DeepSpeedCPUAdam))  # AcceleratedOptimizer-like
    args = types.SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, lr_scheduler_type="constant")
    with pytest.raises(TypeError, match='zero_force_ds_cpu_optimizer": false'):
        ScheduleFreeCallback().on_train_begin(args, None, None, optimizer=swapped)
