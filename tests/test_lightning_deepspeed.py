"""Lightning's ``DeepSpeedStrategy`` with :class:`~sharded_msam_sf.integrations.lightning.ScheduleFreeCallback`
on 2 gloo CPU ranks. Lightning runs this strategy on CUDA only (``setup_environment`` raises on the
CPU accelerator: asserted below); the runs use a subclass that lifts that check and gives DeepSpeed
device index 0 (``root_device.index`` is None on the CPU), and is otherwise Lightning's strategy:
its ``deepspeed.initialize``, its engine backward and step, its DeepSpeed precision plugin.

ZeRO-2 and ZeRO-3; one_pass under automatic optimization (attached by ``register()``, or by the
callback at fit start), two_pass under manual optimization; two_pass under automatic optimization
is refused. The weights validated at each epoch end and the x at the end of fit equal the
single-process reference on the same global batches (tests/test_lightning.py's data and reference).
ZeRO-2 with a ModelCheckpoint: the first epoch's checkpoint holds x, and ``fit(ckpt_path=)`` from it
(other initial weights) ends at the uninterrupted run's x, bit for bit."""
from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

from tests import ds_scenarios as S  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

TOL = 1e-6
# name: (stage, sam_mode, manual, register)
CASES = {"zero2/one_pass/automatic/register": (2, "one_pass", False, True),
         "zero3/one_pass/automatic/callback-attach": (3, "one_pass", False, False),
         "zero2/two_pass/manual/callback-attach": (2, "two_pass", True, False)}
# name: (stage, sam_mode, manual, register)
RESUME_CASES = {"zero2/one_pass/automatic/callback-attach/checkpoint-resume": (2, "one_pass", False, False)}


def _cpu_strategy(stage):
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.parallel import ParallelStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self):  # DeepSpeedStrategy's check for a CUDA accelerator, left out
            ParallelStrategy.setup_environment(self)

        @property
        def root_device(self):  # deepspeed.initialize(args.device_rank=root_device.index) needs an int
            return torch.device("cpu", 0)

    return CPUDeepSpeedStrategy(stage=stage, process_group_backend="gloo")


def _fit(stage, mode, manual, world, strategy=None, checkpoint_dir=None, ckpt_path=None, seed=0):
    """Lightning's fit; ``checkpoint_dir``: a ModelCheckpoint there at every epoch end
    (``epoch=E.ckpt``, a DeepSpeed checkpoint directory); ``ckpt_path``: resume from it;
    ``seed``: of the module's initial weights."""
    import warnings

    import torch

    from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback
    from tests.test_lightning import EPOCHS, Module, loaders
    from tests.models import tiny_mlp
    torch.manual_seed(0)
    m = Module(mode, manual)
    if seed:
        m.net.load_state_dict(tiny_mlp(seed).state_dict())
    callbacks = [ScheduleFreeCallback()]
    if checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1,
                                                      save_on_train_epoch_end=True, filename="{epoch}"))
    t = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=world, logger=False,
                   strategy=strategy or _cpu_strategy(stage), enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=checkpoint_dir is not None, callbacks=callbacks, limit_val_batches=1,
                   num_sanity_val_steps=0, use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(m, *loaders(world), ckpt_path=ckpt_path)
    return t, m


def _flat_x(facade, module):
    import torch
    sd = facade.eval_state_dict()
    return torch.cat([sd[f"net.{n}"].reshape(-1) for n, _ in module.net.named_parameters()])


def _saved_weights(ckpt):
    """The weights in a DeepSpeed checkpoint directory saved by Lightning: the engine module's
    state (``checkpoint/mp_rank_00_model_states.pt``) and the fp32 masters (DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint``), both flat in the module's parameter order."""
    import os

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.test_lightning import Module
    names = [f"net.{n}" for n, _ in Module("one_pass").net.named_parameters()]
    module = torch.load(os.path.join(ckpt, "checkpoint", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    masters = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="checkpoint")
    return tuple(torch.cat([sd[n].float().reshape(-1) for n in names]) for sd in (module, masters))


def _ranks(rank, world, rec, root):
    import os

    import torch

    from sharded_msam_sf.deepspeed import find_optimizer, register, unregister
    from tests.test_lightning import reference

    def case(name, stage, mode, manual, reg):
        if reg:
            register()
        try:
            t, m = _fit(stage, mode, manual, world)
        finally:
            unregister()
        facade = find_optimizer(t.optimizers[0], bind=False)
        ref = reference(mode, world=world)
        rec(name, engine=type(t.strategy.model).__name__, facade=type(facade).__name__,
            k=[g["k"] for g in facade.param_groups], eval_mode=not facade.train_mode,
            vs_reference=float((_flat_x(facade, m) - ref[-1]).abs().max()))
        if stage != 3:  # ZeRO-3 partitions the module's weights: validation_step sees no full tensor
            rec(name, seen_vs_reference=max(float((a - b).abs().max()) for a, b in zip(m.seen, ref)),
                seen=len(m.seen))
        t.strategy.model.destroy()

    def refused(name):
        try:
            _fit(2, "two_pass", False, world)
            rec(name, raised=None)
        except ValueError as e:
            rec(name, raised=str(e))

    def cuda_only(name):
        from lightning.pytorch.strategies import DeepSpeedStrategy
        try:
            _fit(2, "one_pass", False, world, strategy=DeepSpeedStrategy(stage=2))
            rec(name, raised=None)
        except RuntimeError as e:
            rec(name, raised=str(e))

    def resume(name, stage, mode, manual, reg):
        """A ModelCheckpoint at each epoch end; fit again from the first epoch's checkpoint."""
        full_dir, first = os.path.join(root, "full"), os.path.join(root, "full", "epoch=0.ckpt")
        if reg:
            register()
        try:
            t, m = _fit(stage, mode, manual, world, checkpoint_dir=full_dir)
            full = _flat_x(find_optimizer(t.optimizers[0], bind=False), m)
            t.strategy.model.destroy()
            torch.distributed.barrier()
            module, masters = _saved_weights(first)
            # other initial weights: everything must come from the checkpoint
            t, m = _fit(stage, mode, manual, world, ckpt_path=first, seed=123)
        finally:
            unregister()
        facade = find_optimizer(t.optimizers[0], bind=False)
        ref = reference(mode, world=world)
        rec(name, saved_module_vs_x=float((module - ref[0]).abs().max()),
            saved_masters_vs_x=float((masters - ref[0]).abs().max()),
            resumed_vs_full=float((_flat_x(facade, m) - full).abs().max()),
            full_vs_reference=float((full - ref[-1]).abs().max()),
            k=[g["k"] for g in facade.param_groups], eval_mode=not facade.train_mode,
            resumed_seen=len(m.seen), resumed_seen_vs_x=[float((a - b).abs().max()) for a, b in zip(m.seen, ref[1:])])
        t.strategy.model.destroy()

    for name, args in CASES.items():
        rec.case(name, lambda: case(name, *args))
    for name, args in RESUME_CASES.items():
        rec.case(name, lambda: resume(name, *args))
    rec.case("two_pass/automatic", lambda: refused("two_pass/automatic"))
    rec.case("cuda_only", lambda: cuda_only("cuda_only"))
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl_ds")
    return S.run_cases(_ranks, root / "results", str(root / "ckpt"))


@pytest.mark.parametrize("case", list(CASES))
def test_lightning_deepspeed_equals_reference(results, case):
    from tests.test_lightning import EPOCHS, PER_EPOCH
    for v in S.case_values(results, case):
        assert v["engine"] == "DeepSpeedEngine" and v["facade"] == "DeepSpeedMSAMOptimizer", v
        assert v["k"] == [EPOCHS * PER_EPOCH] * len(v["k"]) and v["eval_mode"], v
        assert v["vs_reference"] <= TOL, v
        if "seen" in v:
            assert v["seen"] == EPOCHS and v["seen_vs_reference"] <= TOL, v


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_lightning_deepspeed_checkpoint_holds_x(results, case):
    """The first epoch's checkpoint (ModelCheckpoint): engine.module's weights and the fp32 masters
    are that epoch's x."""
    for r, v in enumerate(S.case_values(results, case)):
        assert v["saved_module_vs_x"] <= TOL, f"rank {r}: saved module weights {v['saved_module_vs_x']} from x"
        assert v["saved_masters_vs_x"] <= TOL, f"rank {r}: saved fp32 masters {v['saved_masters_vs_x']} from x"


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_lightning_deepspeed_resume_equals_the_uninterrupted_run(results, case):
    from tests.test_lightning import EPOCHS, PER_EPOCH
    for r, v in enumerate(S.case_values(results, case)):
        assert v["full_vs_reference"] <= TOL, f"rank {r}: the uninterrupted run is {v['full_vs_reference']} from x"
        assert v["resumed_vs_full"] == 0.0, f"rank {r}: resumed x differs by {v['resumed_vs_full']}"
        assert v["k"] == [EPOCHS * PER_EPOCH] * len(v["k"]) and v["eval_mode"], f"rank {r}: {v}"
        # the resumed fit trained (and validated) the epochs after the checkpoint's only
        assert v["resumed_seen"] == EPOCHS - 1, f"rank {r}: the resumed fit validated {v['resumed_seen']} epochs"
        assert all(d <= TOL for d in v["resumed_seen_vs_x"]), f"rank {r}: validated {v['resumed_seen_vs_x']} from x"


def test_two_pass_automatic_optimization_is_refused(results):
    for v in S.case_values(results, "two_pass/automatic"):
        assert v["raised"] is not None and "manual optimization" in v["raised"], v


def test_lightnings_deepspeed_strategy_needs_cuda(results):
    for v in S.case_values(results, "cuda_only"):
        assert v["raised"] == "The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used.", v
