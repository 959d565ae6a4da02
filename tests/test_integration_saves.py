"""Saves through the framework integrations hold x or fail clearly: the HF Trainer without
ScheduleFreeCallback warns on its first checkpoint (its model files hold y); trainer.save_model() called
mid-training with the callback writes x; Lightning's save_checkpoint inside training_step is refused with a
message (it used to break autograd). One process, tiny models."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from tests import hf_common as H  # noqa: E402

STEPS = 3


def _trainer(tmp_path, callbacks, **kw):
    from transformers import Trainer

    from sharded_msam_sf import AdamWMSAMScheduleFree
    args = H.training_args(str(tmp_path), STEPS, use_cpu=True, **kw)
    return Trainer(model=H.make_model(), args=args, train_dataset=H.dataset(), eval_dataset=H.dataset(),
                   optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(H.OPT_KW, sam_mode="one_pass")),
                   callbacks=callbacks)


def test_hf_trainer_without_the_callback_warns_once(tmp_path):
    trainer = _trainer(tmp_path, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()  # checkpoints at steps 2 and 3
    ours = [w for w in caught if "without ScheduleFreeCallback" in str(w.message)]
    assert len(ours) == 1 and "the saved model holds y" in str(ours[0].message)


def test_hf_save_model_mid_training_writes_x(tmp_path):
    from transformers import TrainerCallback

    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback

    class SaveAtTwo(TrainerCallback):
        trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.trainer.save_model(str(tmp_path / "mid"))
    saver = SaveAtTwo()
    trainer = _trainer(tmp_path, [ScheduleFreeCallback(), saver], save_strategy="no")
    saver.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "without ScheduleFreeCallback" in str(w.message)]  # the callback is there
    ref = H.reference(STEPS, "one_pass", at=[2, STEPS])
    assert H.max_diff(H.saved_weights(os.path.join(tmp_path, "mid")), ref[2]) < 1e-6
    weights = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert H.max_diff(weights, ref[STEPS]) < 1e-6  # the run went on from y, unchanged by the save


def test_lightning_save_checkpoint_inside_training_step_is_refused(tmp_path):
    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback
    from tests.models import mse, tiny_mlp

    class Saving(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp()

        def training_step(self, batch, _):
            loss = mse(self.net, *batch)
            self.trainer.save_checkpoint(str(tmp_path / "in_step.ckpt"))
            return loss

        def configure_optimizers(self):
            return AdamWMSAMScheduleFree(self.net.parameters(), lr=0.02)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 5), torch.randn(8, 3))
    t = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[ScheduleFreeCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="save_checkpoint\\(\\) inside training_step .* is refused"):
            t.fit(Saving(), torch.utils.data.DataLoader(ds, batch_size=4))
