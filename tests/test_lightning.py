"""Lightning with :class:`sharded_msam_sf.integrations.lightning.ScheduleFreeCallback`: the weights
Lightning validates, checkpoints and ends with are x of the single-process reference loop on the same
batches (automatic optimization in both modes — two_pass through ``step(closure)`` —, manual
optimization, DDP on 2 gloo ranks); resume from a checkpoint is bit-exact; refused routes raise."""
from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402
from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.models import flat, mse, tiny_mlp  # noqa: E402

HP = dict(lr=0.02, warmup_steps=2)
B, PER_EPOCH, EPOCHS = 4, 3, 2


def data(world: int = 1):
    g = torch.Generator().manual_seed(7)
    n = B * PER_EPOCH * world
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


class Module(pl.LightningModule):
    def __init__(self, mode: str, manual: bool = False):
        super().__init__()
        self.net = tiny_mlp()
        self.mode, self.seen = mode, []
        self.automatic_optimization = not manual

    def training_step(self, batch, _):
        x, y = batch
        if self.automatic_optimization:
            return mse(self.net, x, y)
        opt = self.optimizers()
        self.manual_backward(mse(self.net, x, y))
        if self.mode == "two_pass":
            opt.optimizer.move_to_ascent()
            self.manual_backward(mse(self.net, x, y))
            opt.optimizer.move_from_ascent()
        opt.step()
        opt.zero_grad()

    def validation_step(self, batch, _):
        if not self.trainer.sanity_checking:
            self.seen.append(flat(self.net).clone())

    def configure_optimizers(self):
        return AdamWMSAMScheduleFree(self.net.parameters(), sam_mode=self.mode, **HP)


def loaders(world: int = 1):
    x, y = data(world)
    ds = torch.utils.data.TensorDataset(x, y)
    if world == 1:
        return torch.utils.data.DataLoader(ds, batch_size=B), torch.utils.data.DataLoader(ds, batch_size=B)
    import torch.distributed as dist   # rank r gets rows r, r + world, ... (Lightning's own sampler shuffles)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=dist.get_rank(), shuffle=False)
    return (torch.utils.data.DataLoader(ds, batch_size=B, sampler=sampler),
            torch.utils.data.DataLoader(ds, batch_size=B, sampler=sampler))


def trainer(tmp=None, epochs=EPOCHS, callbacks=(), **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=tmp is not None, default_root_dir=tmp,
                      callbacks=[ScheduleFreeCallback(), *callbacks], limit_val_batches=1, **kw)


def reference(mode: str, world: int = 1):
    """The plain loop on the global batches; x at the end of each epoch."""
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), sam_mode=mode, **HP)
    x, y = data(world)
    xs = []
    opt.train()
    for _ in range(EPOCHS):
        for i in range(PER_EPOCH):
            xb, yb = x[i * B * world:(i + 1) * B * world], y[i * B * world:(i + 1) * B * world]
            # (DDP: DistributedSampler without shuffle gives rank r the rows r, r + world, ... of this range)
            mse(model, xb, yb).backward()
            if mode == "two_pass":
                opt.move_to_ascent()
                mse(model, xb, yb).backward()
                opt.move_from_ascent()
            opt.step()
            opt.zero_grad()
        opt.eval()
        xs.append(flat(model).clone())
        opt.train()
    opt.eval()
    return xs


def _fit(mode, manual=False, tmp=None, callbacks=(), ckpt_path=None, epochs=EPOCHS):
    torch.manual_seed(0)
    m = Module(mode, manual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp, epochs, callbacks).fit(m, *loaders(), ckpt_path=ckpt_path)
    return m


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_validation_and_final_weights_are_the_reference_x(mode, manual):
    m = _fit(mode, manual)
    ref = reference(mode)
    assert len(m.seen) == EPOCHS
    for a, b in zip(m.seen, ref):
        assert (a - b).abs().max().item() <= 1e-6
    assert (flat(m.net) - ref[-1]).abs().max().item() <= 1e-6
    assert (ref[-1] - flat(tiny_mlp())).abs().max().item() > 1e-3  # it trained


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_checkpoint_holds_x_and_resume_is_exact(mode, tmp_path):
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1,
                                      save_on_train_epoch_end=True, filename="{epoch}")
    full = _fit(mode, tmp=str(tmp_path), callbacks=[ck])
    ref = reference(mode)
    first = tmp_path / "epoch=0.ckpt"
    saved = torch.load(first, weights_only=False)
    sd = saved["state_dict"]
    weights = torch.cat([sd[k].reshape(-1) for k in full.state_dict()])
    assert (weights - ref[0]).abs().max().item() <= 1e-6
    assert all(not g["train_mode"] for g in saved["optimizer_states"][0]["param_groups"])
    resumed = _fit(mode, tmp=str(tmp_path / "r"), ckpt_path=str(first))
    assert torch.equal(flat(resumed.net), flat(full.net))


def test_without_the_callback_the_first_step_raises():
    m = Module("one_pass")
    t = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="call optimizer.train\\(\\)"):
        t.fit(m, loaders()[0])


def _ddp(rank, world_size, mode):
    torch.manual_seed(0)
    m = Module(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                       callbacks=[ScheduleFreeCallback()], limit_val_batches=1, num_sanity_val_steps=0,
                       use_distributed_sampler=False)
        t.fit(m, *loaders(world_size))
    out = dict(final=flat(m.net).tolist(), seen=[s.tolist() for s in m.seen], world=t.world_size,
               backend=type(t.optimizers[0].backend).__name__)
    del t, m
    return out


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_ddp_two_ranks_equals_the_global_batch_reference(mode):
    runs = run_ranks(_ddp, 2, mode, timeout=240)
    ref = reference(mode, world=2)
    for rank, r in runs.items():
        assert r["world"] == 2, (rank, r["world"])
        assert r["backend"] == "LocalBackend", (rank, r["backend"])
        diff = (torch.tensor(r["final"]) - ref[-1]).abs().max().item()
        assert diff <= 1e-6, (rank, diff)
        assert len(r["seen"]) == EPOCHS, (rank, len(r["seen"]))
        assert all((torch.tensor(a) - b).abs().max().item() <= 1e-6 for a, b in zip(r["seen"], ref)), rank
    print(f"MAXDIFF lightning-ddp {mode} {(torch.tensor(runs[0]['final']) - ref[-1]).abs().max().item():.3e}")
