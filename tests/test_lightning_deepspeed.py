"""Lightning's ``DeepSpeedStrategy`` with :class:`~sharded_msam_sf.integrations.lightning.ScheduleFreeCallback`
on 2 gloo CPU ranks. Lightning runs this strategy on CUDA only (``setup_environment`` raises on the
CPU accelerator: asserted below); the runs use a subclass that lifts that check and gives DeepSpeed
device index 0 (``root_device.index`` is None on the CPU), and is otherwise Lightning's strategy:
its ``deepspeed.initialize``, its engine backward and step, its DeepSpeed precision plugin.

ZeRO-2 and ZeRO-3; one_pass under automatic optimization (attached by ``register()``, or by the
callback at fit start), two_pass under manual optimization; two_pass under automatic optimization
is refused. The weights validated at each epoch end and the x at the end of fit equal the
single-process reference on the same global batches (tests/test_lightning.py's data and reference)."""
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


def _fit(stage, mode, manual, world, strategy=None):
    import warnings

    import torch

    from sharded_msam_sf.integrations.lightning import ScheduleFreeCallback
    from tests.test_lightning import EPOCHS, Module, loaders
    torch.manual_seed(0)
    m = Module(mode, manual)
    t = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=world, logger=False,
                   strategy=strategy or _cpu_strategy(stage), enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, callbacks=[ScheduleFreeCallback()], limit_val_batches=1,
                   num_sanity_val_steps=0, use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(m, *loaders(world))
    return t, m


def _flat_x(facade, module):
    import torch
    sd = facade.eval_state_dict()
    return torch.cat([sd[f"net.{n}"].reshape(-1) for n, _ in module.net.named_parameters()])


def _ranks(rank, world, rec):
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

    for name, args in CASES.items():
        rec.case(name, lambda: case(name, *args))
    rec.case("two_pass/automatic", lambda: refused("two_pass/automatic"))
    rec.case("cuda_only", lambda: cuda_only("cuda_only"))
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("pl_ds"))


@pytest.mark.parametrize("case", list(CASES))
def test_lightning_deepspeed_equals_reference(results, case):
    from tests.test_lightning import EPOCHS, PER_EPOCH
    for v in S.case_values(results, case):
        assert v["engine"] == "DeepSpeedEngine" and v["facade"] == "DeepSpeedMSAMOptimizer", v
        assert v["k"] == [EPOCHS * PER_EPOCH] * len(v["k"]) and v["eval_mode"], v
        assert v["vs_reference"] <= TOL, v
        if "seen" in v:
            assert v["seen"] == EPOCHS and v["seen_vs_reference"] <= TOL, v


def test_two_pass_automatic_optimization_is_refused(results):
    for v in S.case_values(results, "two_pass/automatic"):
        assert v["raised"] is not None and "manual optimization" in v["raised"], v


def test_lightnings_deepspeed_strategy_needs_cuda(results):
    for v in S.case_values(results, "cuda_only"):
        assert v["raised"] == "The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used.", v
