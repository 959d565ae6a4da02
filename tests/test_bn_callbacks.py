"""``recalibrate_bn=N`` on the HF and Lightning callbacks: at every evaluation and in every checkpoint the
BatchNorm statistics belong to x.

The oracle is order-free: N batches cover the training set exactly once, so the first BatchNorm's input
(the first convolution of every training sample, which no batch statistic touches) is the same set of
values whatever the loader's order; its float64 mean and unbiased variance at the weights evaluated or
saved must equal the running statistics there. Without ``recalibrate_bn`` they do not (the test could fail).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402
from tests import bn_common as B  # noqa: E402

N_DATA, BATCH = 32, 8
TOL = 1e-5


def first_bn_oracle(conv: torch.nn.Module, x: torch.Tensor):
    """mean and unbiased var per channel of ``conv(x)`` over everything, float64."""
    with torch.no_grad():
        out = conv(x).double()
    flat = out.transpose(0, 1).reshape(out.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def assert_first_bn(conv, bn, x, expect_equal=True):
    mean, var = first_bn_oracle(conv, x)
    ok = (torch.allclose(bn.running_mean.double(), mean, atol=TOL, rtol=TOL)
          and torch.allclose(bn.running_var.double(), var, atol=TOL, rtol=TOL))
    assert ok == expect_equal, ((bn.running_mean.double() - mean).abs().max(),
                                (bn.running_var.double() - var).abs().max())


# ---------------------------------------------------------------------- HF Trainer
transformers = pytest.importorskip("transformers")


def hf_model():
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8],
                                                     depths=[1, 1], layer_type="basic", num_labels=4))


def hf_data():
    x, y = B.data(N_DATA, seed=3)
    return x, y, [{"pixel_values": x[i], "labels": y[i]} for i in range(N_DATA)]


@pytest.mark.parametrize("recal", [N_DATA // BATCH, 0])
def test_hf_callback_evaluates_and_saves_statistics_at_x(tmp_path, recal):
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback
    x, _, ds = hf_data()
    seen = []

    class Record(TrainerCallback):   # before ScheduleFreeCallback: on_evaluate, still at x
        def on_evaluate(self, args, state, control, model=None, **kw):
            emb = model.resnet.embedder.embedder
            seen.append((state.global_step, emb.convolution.weight.detach().clone(),
                         emb.normalization.running_mean.clone(), emb.normalization.running_var.clone()))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=6,
                             learning_rate=0.02, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=3,
                             save_strategy="steps", save_steps=3, logging_strategy="no", report_to=[], seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=0.0, use_cpu=True)
    model = hf_model()
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds[:8],
                      optimizer_cls_and_kwargs=(AdamWMSAMScheduleFree, dict(warmup_steps=2)),
                      callbacks=[Record(), ScheduleFreeCallback(recalibrate_bn=recal)])
    trainer.train()
    assert [s for s, *_ in seen] == [3, 6]
    for step, w, mean, var in seen:
        conv = torch.nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        conv.weight.data.copy_(w)
        bn = torch.nn.BatchNorm2d(8)
        bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        assert_first_bn(conv, bn, x, expect_equal=bool(recal))
    from tests.hf_common import saved_weights
    for step in (3, 6):
        saved = saved_weights(str(tmp_path / f"checkpoint-{step}"))
        m = hf_model()
        m.load_state_dict(saved)
        emb = m.resnet.embedder.embedder
        assert_first_bn(emb.convolution, emb.normalization, x, expect_equal=bool(recal))
    # the end of training: save_model() after train() also holds statistics at x
    emb = model.resnet.embedder.embedder
    assert_first_bn(emb.convolution, emb.normalization, x, expect_equal=bool(recal))


def test_hf_callback_refuses_a_bad_count():
    from sharded_msam_sf.integrations.hf import ScheduleFreeCallback
    with pytest.raises(ValueError, match="recalibrate_bn must be an int >= 0"):
        ScheduleFreeCallback(recalibrate_bn=-1)


# ---------------------------------------------------------------------- Lightning
def _lightning_module(pl):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = B.make_model()
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            if self.trainer.sanity_checking or (self.seen and self.seen[-1][0] == self.trainer.global_step):
                return
            self.seen.append((self.trainer.global_step, self.net.conv1.weight.detach().clone(),
                                  self.net.conv1.bias.detach().clone(), self.net.bn1.running_mean.clone(),
                                  self.net.bn1.running_var.clone()))

        def configure_optimizers(self):
            return AdamWMSAMScheduleFree(self.net.parameters(), lr=0.02, warmup_steps=2)
    return Module()


@pytest.mark.parametrize("recal", [N_DATA // BATCH, 0])
def test_lightning_callback_validates_and_saves_statistics_at_x(tmp_path, recal):
    pl = pytest.importorskip("lightning.pytorch")
    from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback
    x, y = B.data(N_DATA, seed=3)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*B.data(8, seed=4)), batch_size=8)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1,
                                        filename="{step}")
    module = _lightning_module(pl)
    trainer = pl.Trainer(max_steps=6, val_check_interval=2, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ScheduleFreeCallback(recalibrate_bn=recal), ckpt])
    trainer.fit(module, train, val)
    assert [s for s, *_ in module.seen] == [2, 4, 6]
    for _, w, b, mean, var in module.seen:
        conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        conv.weight.data.copy_(w), conv.bias.data.copy_(b)
        bn = torch.nn.BatchNorm2d(6)
        bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        assert_first_bn(conv, bn, x, expect_equal=bool(recal))
    files = sorted(os.listdir(tmp_path))
    assert files == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"], files
    for f in files:
        sd = torch.load(tmp_path / f, weights_only=True)["state_dict"]
        net = B.make_model()
        net.load_state_dict({k[len("net."):]: v for k, v in sd.items()})
        assert_first_bn(net.conv1, net.bn1, x, expect_equal=bool(recal))
