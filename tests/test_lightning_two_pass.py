"""Lightning two_pass with ``gradient_clip_val`` and ``accumulate_grad_batches`` (automatic optimization through
``step(closure)``; manual optimization with :func:`sharded_msam_sf.accumulation.two_pass_step`; DDP on 2 gloo
ranks with the gradient all-reduces counted): the final weights equal the single-process loop on the global
batches that clips g (the gradient the update uses) and folds g0 unclipped. Lightning Fabric with DDP on the same
2 rank processes (two_pass, ``fabric.save`` after ``eval()``): the saved weights are x of the reference."""
from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from sharded_msam_sf import AdamWMSAMScheduleFree  # noqa: E402
from sharded_msam_sf.accumulation import two_pass_step  # noqa: E402
from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.models import flat, mse, tiny_mlp  # noqa: E402

HP = dict(lr=0.02, rho=0.05, warmup_steps=2, sam_mode="two_pass")
B, PER_EPOCH, EPOCHS, CLIP, TOL = 4, 4, 2, 0.05, 1e-6


def data(world: int = 1):
    g = torch.Generator().manual_seed(7)
    n = B * PER_EPOCH * world
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


class Module(pl.LightningModule):
    def __init__(self, manual_chunks: int = 0):
        super().__init__()
        self.net = tiny_mlp()
        self.chunks = manual_chunks
        self.automatic_optimization = not manual_chunks

    def training_step(self, batch, _):
        x, y = batch
        if self.automatic_optimization:
            return mse(self.net, x, y)
        opt = self.optimizers()  # manual: accumulation over chunks of the batch, clipping g
        two_pass_step(opt.optimizer, list(zip(x.chunk(self.chunks), y.chunk(self.chunks))),
                      lambda b: mse(self.net, *b),
                      clip=lambda: self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm"))

    def configure_optimizers(self):
        return AdamWMSAMScheduleFree(self.net.parameters(), **HP)


def loader(world: int = 1, batch_size: int = B):
    x, y = data(world)
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = None
    if world > 1:  # rank r gets rows r, r + world, ... (Lightning's own sampler would shuffle)
        import torch.distributed as dist
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=dist.get_rank(), shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler)


def reference(rows_per_step: int, clip: float = CLIP, clip_g0: bool = False, world: int = 1):
    """The plain two_pass loop, each step on ``rows_per_step`` consecutive rows of the data."""
    model = tiny_mlp()
    opt = AdamWMSAMScheduleFree(model.parameters(), **HP)
    x, y = data(world)
    opt.train()
    for _ in range(EPOCHS):
        for i in range(0, len(x), rows_per_step):
            xb, yb = x[i:i + rows_per_step], y[i:i + rows_per_step]
            mse(model, xb, yb).backward()
            if clip_g0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.move_to_ascent()
            mse(model, xb, yb).backward()
            opt.move_from_ascent()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    opt.eval()
    return flat(model)


def _fit(module, world=1, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[ScheduleFreeCallback()],
                   limit_val_batches=0, **kw).fit(module, loader(world))
    return flat(module.net)


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
def test_automatic_clip_and_accumulation(accum):
    final = _fit(Module(), gradient_clip_val=CLIP, accumulate_grad_batches=accum)
    ref = reference(B * accum)
    assert (final - ref).abs().max().item() <= TOL
    print(f"MAXDIFF lightning automatic two_pass accum{accum} clip {(final - ref).abs().max().item():.2e}")
    assert (ref - reference(B * accum, clip_g0=True)).abs().max().item() > 1e-4  # what it did before
    assert (ref - reference(B * accum, clip=0.0)).abs().max().item() > 1e-4      # the clip acts


def test_manual_two_pass_step_over_chunks():
    final = _fit(Module(manual_chunks=2))
    assert (final - reference(B)).abs().max().item() <= TOL
    print(f"MAXDIFF lightning manual two_pass_step 2 chunks clip {(final - reference(B)).abs().max().item():.2e}")


def _ddp(rank, world_size, out):
    counts = []

    class CountGradAllReduces(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            import torch.distributed as dist

            def hook(state, bucket):
                counts[-1] += 1
                fut = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])
            trainer.strategy.model.register_comm_hook(None, hook)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 2 == 0:
                counts.append(0)

    m = Module()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                       callbacks=[ScheduleFreeCallback(), CountGradAllReduces()], limit_val_batches=0,
                       use_distributed_sampler=False, gradient_clip_val=CLIP, accumulate_grad_batches=2)
        t.fit(m, loader(world_size))
    return dict(final=flat(m.net).tolist(), counts=counts, fabric=_fabric(rank, world_size, out),
                fabric_ckpt=f"{out}/fabric.ckpt")


def _fabric(rank, world_size, out):
    """Lightning Fabric, DDP: the seed's two_pass loop with fabric.backward; eval(), then fabric.save."""
    from lightning.fabric import Fabric
    fabric = Fabric(accelerator="cpu", devices=world_size, strategy="ddp")
    fabric.launch()
    net = tiny_mlp()
    model, opt = fabric.setup(net, AdamWMSAMScheduleFree(net.parameters(), **HP))
    x, y = data(world_size)
    mine_x, mine_y = x[rank::world_size], y[rank::world_size]  # rank r: rows r, r + 2, ... as the sampler above
    opt.train()
    for _ in range(EPOCHS):
        for i in range(PER_EPOCH):
            xb, yb = mine_x[i * B:(i + 1) * B], mine_y[i * B:(i + 1) * B]
            fabric.backward(mse(model, xb, yb))
            opt.move_to_ascent()
            fabric.backward(mse(model, xb, yb))
            opt.move_from_ascent()
            opt.step()
            opt.zero_grad()
    opt.eval()
    fabric.save(f"{out}/fabric.ckpt", {"model": model, "optimizer": opt})
    fabric.barrier()
    return dict(final=flat(net).tolist(), type=type(opt).__name__)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_ranks(_ddp, 2, str(tmp_path_factory.mktemp("fabric")), timeout=300)


def test_fabric_ddp_two_ranks_saves_x(ddp_runs, tmp_path_factory):
    ref = reference(2 * B, clip=0.0, world=2)
    for rank, r in ddp_runs.items():
        diff = (torch.tensor(r["fabric"]["final"]) - ref).abs().max().item()
        assert diff <= TOL, (rank, diff)
    saved = torch.load(f"{ddp_runs[0]['fabric_ckpt']}", weights_only=True)
    weights = torch.cat([t.reshape(-1) for t in saved["model"].values()])
    assert (weights - ref).abs().max().item() <= TOL
    assert all(not g["train_mode"] for g in saved["optimizer"]["param_groups"])
    print(f"MAXDIFF fabric-ddp two_pass saved {(weights - ref).abs().max().item():.2e}")


def test_ddp_two_ranks_accumulation_and_clip(ddp_runs):
    runs = ddp_runs
    # each step: 2 micro-batches x 2 ranks x B rows; DistributedSampler(shuffle=False) gives rank r rows r, r+2, ...
    # so a step covers 4B consecutive rows of the data
    ref = reference(4 * B, world=2)
    for rank, r in runs.items():
        diff = (torch.tensor(r["final"]) - ref).abs().max().item()
        assert diff <= TOL, (rank, diff)
        assert r["counts"] == [2] * (EPOCHS * PER_EPOCH // 2), (rank, r["counts"])
    print(f"MAXDIFF lightning-ddp two_pass accum2 clip {(torch.tensor(runs[0]['final']) - ref).abs().max().item():.2e}")
