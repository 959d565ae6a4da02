"""DeepSpeed's PipelineModule / PipelineEngine with ZeRO-1, on 2 gloo ranks (pp=2) and 4 (pp=2 × dp=2),
against the single-process optimizer on the whole model.

The model (:func:`layers`): a tied bias-free Linear (``TiedLayerSpec``, used at the start and again
near the end, so stage 0 and stage 1 each hold a copy whose gradients DeepSpeed all-reduces), Linear,
tanh, Linear, the tied Linear, and a head with a frozen scale (a parameter without gradient);
``partition_method="uniform"`` puts three layers on each stage. Two param groups (weights, biases).
Each rank feeds ``engine.train_batch()`` its data-parallel share of the global batch as two
micro-batches. The reference (:class:`PipeRef`) is the same layers in one module with the same
parameter names, one step on the whole global batch.

Checked on every rank: each stage's eval-mode fp32 masters and module weights equal the
reference's; the one-pass ascent scale is the same on every stage; one all-reduce of G+1 float64
over all ranks per step; the norm must span the stages and count the tied weight once — with the
tied weight counted per stage, or the stats reduced over one stage only, the trajectory leaves the
reference. two_pass is refused (``initialize`` and ``attach``): ``train_batch()`` evaluates the
gradient and steps in one call, leaving no place for the ascent and a second gradient.
"""
import pytest
import torch

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

STEPS, GAS = 3, 2
TOL = 1e-5
PP = 2
PP_CASES = ["initialize/one_pass", "attach/one_pass"]
MUTANTS = ["tied_counted_twice", "stage_local_norm"]
# bf16 with fp32 gradient accumulation: the pipeline runs DeepSpeed's BF16_Optimizer (ZeRO-1)
BF16 = "bf16opt/one_pass"


class Head(torch.nn.Module):
    """Linear times a frozen scale (a parameter that never has a gradient)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, d_out), requires_grad=False)

    def forward(self, x):
        return self.lin(x) * self.scale


def _tied():
    return torch.nn.Linear(S.IN, S.IN, bias=False)


def layers():
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    return [TiedLayerSpec("emb", torch.nn.Linear, S.IN, S.IN, bias=False), LayerSpec(torch.nn.Linear, S.IN, S.HID),
            LayerSpec(torch.nn.Tanh), LayerSpec(torch.nn.Linear, S.HID, S.IN),
            TiedLayerSpec("emb", torch.nn.Linear, S.IN, S.IN, bias=False), LayerSpec(Head, S.IN, S.OUT)]


class PipeRef(torch.nn.Module):
    """The pipeline's layers in one module, with PipelineModule's parameter names."""

    def __init__(self):
        super().__init__()
        self.tied_modules = torch.nn.ModuleDict({"emb": _tied()})
        for i, layer in ((1, torch.nn.Linear(S.IN, S.HID)), (2, torch.nn.Tanh()), (3, torch.nn.Linear(S.HID, S.IN)),
                         (5, Head(S.IN, S.OUT))):
            self.add_module(str(i), layer)

    def forward(self, x):
        emb = self.tied_modules["emb"]
        for f in (emb, self._modules["1"], self._modules["2"], self._modules["3"], emb, self._modules["5"]):
            x = f(x)
        return x


def make_ref(seed: int = 0) -> PipeRef:
    torch.manual_seed(seed)
    return PipeRef()


def make_pipe():
    """The PipelineModule, each stage's params set from :func:`make_ref` (DeepSpeed builds them randomly)."""
    from deepspeed.pipe import PipelineModule
    pipe = PipelineModule(layers=layers(), num_stages=PP, loss_fn=S.loss_fn, partition_method="uniform")
    ref = dict(make_ref().named_parameters())
    with torch.no_grad():
        for name, p in pipe.named_parameters():
            p.copy_(ref[name])
    return pipe


def _data(engine, k):
    """This rank's data-parallel share of step k's global batch, as GAS micro-batches."""
    dp, rank = engine.grid.get_data_parallel_world_size(), engine.grid.get_data_parallel_rank()
    x, y = S.batch(k)
    per, micro = S.GLOBAL_BATCH // dp, S.GLOBAL_BATCH // dp // GAS
    dtype = next(engine.module.parameters()).dtype
    xs, ys = x[rank * per:(rank + 1) * per].to(dtype), y[rank * per:(rank + 1) * per]
    return iter([(xs[j * micro:(j + 1) * micro], ys[j * micro:(j + 1) * micro]) for j in range(GAS)])


def _stats_reduces(cc):
    return [c for c in cc.records if c.name == "all_reduce" and c.shape == (3,) and c.bytes == 24]


def _ranks(rank, world, rec):
    import deepspeed
    import torch.distributed as dist

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.backends.base import Reduction, group_ranks
    from sharded_msam_sf.testing.comm_count import CommCounter
    from sharded_msam_sf.deepspeed import attach, init_distributed, initialize
    from sharded_msam_sf.deepspeed.ds_config import client_config

    init_distributed("gloo")
    dp = world // PP
    ref = S.reference_run(STEPS, "one_pass", make=make_ref)

    def build(route, mode="one_pass", dtype="fp32"):
        cfg = S.ds_config(1, dtype, mode, gas=GAS if mode == "one_pass" else 1, world=dp,  # two_pass: gas 1
                          bf16_optimizer=dtype == "bf16")
        pipe = make_pipe()
        if route == "initialize":
            engine, opt, _, _ = initialize(model=pipe, model_parameters=S.param_groups(pipe), config=cfg)
            return engine, opt
        p = cfg["optimizer"]["params"]
        ours = AdamWMSAMScheduleFree(S.param_groups(pipe, p["lr"]), lr=p["lr"], rho=p["rho"], sam_mode=p["sam_mode"],
                                     betas=tuple(p["betas"]), weight_decay=p["weight_decay"],
                                     warmup_steps=p["warmup_steps"])
        engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=ours, config=client_config(cfg))
        return engine, attach(engine)

    def run(name, route, mutant=None):
        with CommCounter() as cc:
            engine, opt = build(route)
            try:
                backend = opt.optimizer.backend
                if mutant == "tied_counted_twice":
                    backend.pieces = {k: tuple((r, 1) for r, _ in v) for k, v in backend.pieces.items()}
                elif mutant == "stage_local_norm":
                    backend.reduction = Reduction(engine.optimizer.dp_process_group, 1, None, weighted=True)
                rec(name, engine=type(engine).__name__, kind=opt.kind, stage=engine.stage_id,
                    reduced_over=group_ranks(backend.reduction.group),
                    replicas=sorted({r for v in backend.pieces.values() for _, r in v}))
                opt.train()
                cc.reset()
                for k in range(STEPS):
                    engine.train_batch(data_iter=_data(engine, k))
                scales = [g["ascent_scale"] for g in opt.param_groups]
                rec(name, stats_reduces=len(_stats_reduces(cc)) / STEPS, k=[g["k"] for g in opt.param_groups],
                    scales=scales, global_steps=engine.global_steps)
                everyone = [None] * world
                dist.all_gather_object(everyone, scales[0])
                rec(name, scales_everywhere=everyone)
                opt.eval()
                masters = opt.eval_state_dict()
                rec(name, names=sorted(masters), vs_reference=max(float((masters[n] - ref[n]).abs().max()) for n in masters),
                    module=max(float((p - ref[n]).abs().max()) for n, p in S.module_weights(engine).items()))
            finally:
                engine.destroy()

    def bf16(name):
        """The BF16_Optimizer's flat partitions: the one-pass scale is −ρ/||m|| with ||m|| taken
        param by param from the full optimizer states (the tied weight once: on its first stage)."""
        engine, opt = build("initialize", dtype="bf16")
        try:
            opt.train()
            for k in range(STEPS):
                engine.train_batch(data_iter=_data(engine, k))
            rec(name, kind=opt.kind, scales=[g["ascent_scale"] for g in opt.param_groups],
                expected_scale=-opt.param_groups[0]["rho"] / _param_by_param_norm(engine))
        finally:
            engine.destroy()

    def two_pass_refused(name):
        try:
            build("initialize", "two_pass")
            rec(name, initialize=None)
        except NotImplementedError as e:
            rec(name, initialize=str(e))
        try:
            engine, _ = build("attach", "two_pass")
            engine.destroy()
            rec(name, attach=None)
        except NotImplementedError as e:
            rec(name, attach=str(e))

    for case in PP_CASES:
        rec.case(case, lambda: run(case, case.split("/")[0]))
    for case in MUTANTS:
        rec.case(case, lambda: run(case, "initialize", mutant=case))
    rec.case("two_pass_refused", lambda: two_pass_refused("two_pass_refused"))
    rec.case(BF16, lambda: bf16(BF16))


def _param_by_param_norm(engine):
    """||m|| from each param's full m (DeepSpeed's ``safe_get_full_optimizer_state``), summed over
    the stages, each tied weight counted on its first stage only (DeepSpeed's ``ds_pipe_replicated``)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state
    sq = sum(float(safe_get_full_optimizer_state(p, "exp_avg").double().pow(2).sum())
             for p in engine.module.parameters() if p.requires_grad and not getattr(p, "ds_pipe_replicated", False))
    t = torch.tensor([sq if engine.grid.get_data_parallel_rank() == 0 else 0.0], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.sqrt())


@pytest.fixture(scope="module", params=[PP, 2 * PP], ids=["pp2", "pp2xdp2"])
def results(request, tmp_path_factory):
    return request.param, S.run_cases(_ranks, tmp_path_factory.mktemp(f"ds_pipe{request.param}"), world=request.param,
                                          timeout=300)


@pytest.mark.parametrize("case", PP_CASES)
def test_trajectory_equals_reference(results, case):
    _, runs = results
    seen = set()
    for v in S.case_values(runs, case):
        assert (v["engine"], v["kind"]) == ("PipelineEngine", "zero12"), v
        assert v["vs_reference"] <= TOL and v["module"] <= TOL, v
        assert v["k"] == [STEPS, STEPS] and v["global_steps"] == STEPS, v
        seen.update(v["names"])
    assert seen == set(n for n, _ in make_ref().named_parameters()), seen  # every param is on some stage


@pytest.mark.parametrize("case", PP_CASES)
def test_norm_spans_all_stages(results, case):
    world, runs = results
    replicas = set()
    for v in S.case_values(runs, case):
        assert v["reduced_over"] == list(range(world)), v
        assert len(set(v["scales_everywhere"])) == 1, v  # one ||m|| on every stage
        assert v["stats_reduces"] == 1, v  # one all-reduce of G + 1 float64 per train_batch()
        replicas.update(v["replicas"])  # (a rank's ZeRO partition may hold no part of the tied weight)
    assert replicas == {1, PP}, replicas  # stage params once, the tied weight on both stages


@pytest.mark.parametrize("mutant", MUTANTS)
def test_wrong_count_leaves_reference(results, mutant):
    _, runs = results
    for v in S.case_values(runs, mutant):
        assert v["vs_reference"] > 10 * TOL, v


def test_bf16_optimizer_scale_uses_the_global_norm(results):
    _, runs = results
    for v in S.case_values(runs, BF16):
        assert v["kind"] == "bf16", v
        for s in v["scales"]:
            assert s == pytest.approx(v["expected_scale"], rel=1e-6), v


def test_two_pass_refused(results):
    _, runs = results
    for v in S.case_values(runs, "two_pass_refused"):
        for route in ("initialize", "attach"):
            assert v[route] is not None and "two_pass" in v[route] and "train_batch()" in v[route], v
