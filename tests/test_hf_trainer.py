"""HF Trainer on one process, both modes: the weights the Trainer evaluates and saves (checkpoints
during training, save_model() after) equal the single-process reference on the same batches;
the lr-schedule warning; the refused routes."""
import os

import pytest

pytest.importorskip("transformers")

from tests import hf_common as H  # noqa: E402

STEPS = 3
TOL = 1e-6


def _train(tmp_path, mode, trainer_cls, **kw):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback
    args = H.training_args(str(tmp_path), STEPS, use_cpu=True, **kw)
    callbacks = [ScheduleFreeCallback()] if trainer_cls.__name__ == "Trainer" else None
    trainer = trainer_cls(model=H.make_model(), args=args, train_dataset=H.dataset(), eval_dataset=H.dataset(),
                          optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode)),
                          callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode,cls", [("one_pass", "Trainer"), ("one_pass", "MSAMTrainer"), ("two_pass", "MSAMTrainer")])
def test_trainer_evaluates_and_saves_x(tmp_path, mode, cls):
    import transformers

    from sharded_msam_sf.integrations import hf
    trainer_cls = transformers.Trainer if cls == "Trainer" else hf.MSAMTrainer
    trainer = _train(tmp_path, mode, trainer_cls)
    ref = H.reference(STEPS, mode, at=[2, STEPS])
    weights = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert H.max_diff(weights, ref[STEPS]) < TOL  # after train(): x
    assert H.max_diff(H.saved_weights(os.path.join(tmp_path, "checkpoint-2")), ref[2]) < TOL
    assert H.max_diff(H.saved_weights(os.path.join(tmp_path, f"checkpoint-{STEPS}")), ref[STEPS]) < TOL
    trainer.save_model(str(tmp_path / "final"))
    assert H.max_diff(H.saved_weights(str(tmp_path / "final")), ref[STEPS]) < TOL
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(float(ref[-1]["loss"]), rel=1e-5)
    opt = trainer.optimizer.optimizer
    assert [g["k"] for g in opt.param_groups] == [STEPS, STEPS]


def test_epoch_checkpoints_hold_x(tmp_path):
    """save_strategy="epoch" (the save is decided at the epoch end, not the step end): one step per epoch here."""
    from transformers import Trainer
    _train(tmp_path, "one_pass", Trainer, save_strategy="epoch")
    ref = H.reference(STEPS, "one_pass", at=[1, 2, STEPS])
    for k in (1, 2, STEPS):
        assert H.max_diff(H.saved_weights(os.path.join(tmp_path, f"checkpoint-{k}")), ref[k]) < TOL


def test_two_pass_differs_from_plain_schedule_free(tmp_path):
    """MSAMTrainer's two_pass takes the ascent (rho > 0 moves the trajectory away from rho = 0)."""
    from sharded_msam_sf.integrations.hf import MSAMTrainer
    trainer = _train(tmp_path, "two_pass", MSAMTrainer)
    weights = {n: p.detach() for n, p in trainer.model.named_parameters()}
    plain = H.reference(STEPS, "two_pass")  # same as trainer
    assert H.max_diff(weights, plain[STEPS]) < TOL
    kw = dict(H.OPT_KW)
    try:
        H.OPT_KW["rho"] = 0.0
        no_ascent = H.reference(STEPS, "two_pass")
    finally:
        H.OPT_KW.clear()
        H.OPT_KW.update(kw)
    assert H.max_diff(weights, no_ascent[STEPS]) > 1e-5


def test_warns_on_a_non_constant_lr_schedule(tmp_path):
    from transformers import Trainer

    with pytest.warns(UserWarning, match='lr_scheduler_type="constant"'):
        _train(tmp_path, "one_pass", Trainer, lr_scheduler_type="linear", save_strategy="no")


def test_refuses_a_trainer_whose_optimizer_is_not_ours(tmp_path):
    from transformers import Trainer

    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback
    args = H.training_args(str(tmp_path), STEPS, use_cpu=True, save_strategy="no")
    trainer = Trainer(model=H.make_model(), args=args, train_dataset=H.dataset(), callbacks=[ScheduleFreeCallback()])
    with pytest.raises(TypeError, match="not AdamWMSAMScheduleFree"):
        trainer.train()


@pytest.mark.parametrize("mode,cls", [("one_pass", "Trainer"), ("two_pass", "MSAMTrainer")])
def test_resume_from_a_checkpoint_is_exact(tmp_path, mode, cls):
    """4 steps with checkpoints every 2; train(resume_from_checkpoint=checkpoint-2) in a fresh Trainer ends on
    the uninterrupted run's x (the checkpoint holds x and the optimizer's eval-mode state; the callback's
    train() at train begin gives back y, and the ascent in one_pass)."""
    import transformers

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.integrations.hf import MSAMTrainer, ScheduleFreeCallback
    trainer_cls = transformers.Trainer if cls == "Trainer" else MSAMTrainer
    steps = 4

    def run(out, resume=None):
        trainer = trainer_cls(model=H.make_model(), args=H.training_args(str(out), steps, use_cpu=True),
                              train_dataset=H.dataset(), callbacks=[ScheduleFreeCallback()],
                              optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode=mode)))
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(out / "final"))
        return trainer

    run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert not (tmp_path / "resumed" / "checkpoint-2").exists()  # it started at step 2
    assert [g["k"] for g in resumed.optimizer.optimizer.param_groups] == [steps, steps]
    final = H.saved_weights(str(tmp_path / "resumed" / "final"))
    assert H.max_diff(final, H.saved_weights(str(tmp_path / "full" / "final"))) == 0.0
    assert H.max_diff(final, H.reference(steps, mode)[steps]) < TOL
