"""DeepSpeed ZeRO with Megatron-style tensor parallelism through ``deepspeed.initialize(..., mpu=mpu)``,
on 4 gloo ranks (tp=2 × dp=2), against the single-process optimizer on the unsplit model.

The model (:class:`FullNet`, unsplit, for the reference) is LayerNorm → Linear → tanh → Linear,
times a frozen scale (a parameter without gradient). Split by hand as Megatron does
(:class:`TPNet`): the first Linear column-parallel (weight rows and bias split; identity forward,
all-reduce of the input gradient backward), the second row-parallel (weight columns split; the
partial outputs all-reduced forward, its bias added after, replicated); the LayerNorm and the
frozen scale replicated. The split params are marked ``tensor_model_parallel = True`` (what
DeepSpeed's ``is_model_parallel_parameter`` reads). Two param groups (weights, biases), each
mixing split and replicated params; the ZeRO partitions are over the data-parallel group.

Checked on every rank: the local shards of the eval-mode fp32 masters equal the matching slices
of the reference (ZeRO-1, -2, -3 × one_pass, two_pass); the one-pass ascent scale is −ρ/||m|| with
||m|| over the unsplit model; the optimizer adds one all-reduce of G+1 float64 over the 4 ranks
per gradient evaluation; and with the replicated params counted tp times (every piece given
replicas 1) the trajectory leaves the reference — the test would catch that bug.
"""
import pytest
import torch

from tests import ds_scenarios as S
from tests.ds_scenarios import shm_op  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]

TP, DP = 2, 2
STEPS = 3
TOL = 1e-5
MODES = ("one_pass", "two_pass")
CASES = {f"zero{stage}/{mode}": (stage, mode) for stage in (1, 2, 3) for mode in MODES}
COUNTED_TWICE = "zero1/one_pass/replicated_counted_twice"
# DeepSpeed's gradient clipping finds the tensor-parallel params by the same marks (its norm adds
# the split params over tp, the others once): with a small max norm every step clips
CLIP, CLIPPED = 0.05, "zero2/one_pass/clipped"
SPLIT = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}  # tensor-parallel params: the dim split over tp


class FullNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(S.IN)
        self.fc1 = torch.nn.Linear(S.IN, S.HID)
        self.fc2 = torch.nn.Linear(S.HID, S.OUT)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, S.OUT), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(self.norm(x)))) * self.scale


def make_full(seed: int = 0) -> FullNet:
    torch.manual_seed(seed)
    model = FullNet()
    with torch.no_grad():  # a LayerNorm that is not the identity
        model.norm.weight.add_(torch.randn(S.IN) * 0.1)
        model.norm.bias.add_(torch.randn(S.IN) * 0.1)
    return model


def shard(name, t, tp_rank):
    """The tp rank's part of the unsplit tensor ``t`` (all of it for a replicated param)."""
    if name not in SPLIT:
        return t
    return t.chunk(TP, dim=SPLIT[name])[tp_rank]


class GroupMesh:
    """A Megatron-style mpu on a tp × dp grid: global rank = dp_rank · TP + tp_rank (tp ranks adjacent)."""

    def __init__(self):
        import torch.distributed as dist
        rank = dist.get_rank()
        self.tp_rank, self.dp_rank = rank % TP, rank // TP
        self.tp_group = self.dp_group = None
        for d in range(DP):  # every rank creates every group, in the same order
            g = dist.new_group([d * TP + t for t in range(TP)])
            if d == self.dp_rank:
                self.tp_group = g
        for t in range(TP):
            g = dist.new_group([d * TP + t for d in range(DP)])
            if t == self.tp_rank:
                self.dp_group = g

    def get_model_parallel_rank(self):
        return self.tp_rank

    def get_model_parallel_world_size(self):
        return TP

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return DP

    def get_data_parallel_group(self):
        return self.dp_group


def _tp_functions(group):
    import torch.distributed as dist

    class CopyToTP(torch.autograd.Function):  # Megatron's f: identity forward, all-reduce backward
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g, group=group)
            return g

    class ReduceFromTP(torch.autograd.Function):  # Megatron's g: all-reduce forward, identity backward
        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    return CopyToTP.apply, ReduceFromTP.apply


class TPNet(torch.nn.Module):
    """:class:`FullNet` split over the tp ranks (the same parameter names, local shapes)."""

    def __init__(self, full: FullNet, mesh: GroupMesh):
        super().__init__()
        self.norm = torch.nn.LayerNorm(S.IN)
        self.fc1 = torch.nn.Linear(S.IN, S.HID // TP)
        self.fc2 = torch.nn.Linear(S.HID // TP, S.OUT)
        self.scale = torch.nn.Parameter(full.scale.detach().clone(), requires_grad=False)
        full_params = dict(full.named_parameters())
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(shard(name, full_params[name], mesh.tp_rank))
                if name in SPLIT:
                    p.tensor_model_parallel = True  # DeepSpeed's is_model_parallel_parameter
        self._copy, self._reduce = _tp_functions(mesh.tp_group)

    def forward(self, x):
        h = torch.tanh(self.fc1(self._copy(self.norm(x))))                     # column-parallel
        out = self._reduce(torch.nn.functional.linear(h, self.fc2.weight)) + self.fc2.bias  # row-parallel
        return out * self.scale


def _stats_reduces(cc):
    """Our stats all-reduces among the counted calls: G + 1 = 3 float64."""
    return [c for c in cc.records if c.name == "all_reduce" and c.shape == (3,) and c.bytes == 24]


def _ranks(rank, world, rec):
    from sharded_msam_sf.backends.base import group_ranks
    from sharded_msam_sf.testing.comm_count import CommCounter
    from sharded_msam_sf.deepspeed import initialize

    mesh = GroupMesh()
    refs = {m: S.reference_run(STEPS, m, make=make_full) for m in MODES}
    refs[CLIPPED] = S.reference_run(STEPS, "one_pass", make=make_full, clip=CLIP)
    rec(CLIPPED, clip_moves_reference=S.max_diff(refs[CLIPPED], refs["one_pass"]))

    def run(name, stage, mode, counted_twice=False, clip=0.0):
        with CommCounter() as cc:
            model = TPNet(make_full(), mesh)
            cfg = S.ds_config(stage, "fp32", mode, world=DP, clip=clip)
            engine, opt, _, _ = initialize(model=model, model_parameters=S.param_groups(model), config=cfg, mpu=mesh)
            try:
                backend = opt.optimizer.backend
                if counted_twice:  # the bug the test must catch: replicated params counted once per tp rank
                    backend.pieces = {k: tuple((r, 1) for r, _ in v) for k, v in backend.pieces.items()}
                rec(name, reduced_over=group_ranks(backend.reduction.group), weighted=backend.reduction.weighted,
                    zero_dp=group_ranks(engine.optimizer.dp_process_group))
                opt.train()
                cc.reset()
                S.ds_train(engine, opt, STEPS, mode, world=DP, rank=mesh.dp_rank)
                rec(name, stats_reduces=len(_stats_reduces(cc)) / STEPS, k=[g["k"] for g in opt.param_groups])
                if mode == "one_pass":
                    rec(name, scales=[g["ascent_scale"] for g in opt.param_groups],
                        expected_scale=-opt.param_groups[0]["rho"] / _global_norm(opt, mesh))
                opt.eval()
                ref = refs[CLIPPED if clip else mode]
                masters = opt.eval_state_dict()
                rec(name, vs_reference=max(float((masters[n] - shard(n, ref[n], mesh.tp_rank)).abs().max())
                                           for n in ref),
                    module=max(float((p.detach() - shard(n, ref[n], mesh.tp_rank)).abs().max())
                               for n, p in S.module_weights(engine).items()))
            finally:
                engine.destroy()

    for name, (stage, mode) in CASES.items():
        rec.case(name, lambda: run(name, stage, mode))
    rec.case(COUNTED_TWICE, lambda: run(COUNTED_TWICE, 1, "one_pass", counted_twice=True))
    rec.case(CLIPPED, lambda: run(CLIPPED, 2, "one_pass", clip=CLIP))


def _global_norm(opt, mesh):
    """||m|| of the unsplit model, from the shards: each rank's m by parameter (DeepSpeed's
    ``safe_get_full_optimizer_state`` gathers the dp partitions), split params summed over tp."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state
    split = replicated = 0.0
    with opt._driver.param_groups_filled():
        for name, p in opt.module.named_parameters():
            if not p.requires_grad:
                continue
            m = safe_get_full_optimizer_state(p, "exp_avg")
            sq = float(m.double().pow(2).sum())
            if name in SPLIT:
                split += sq
            else:
                replicated += sq
    t = torch.tensor([split], dtype=torch.float64)
    dist.all_reduce(t, group=mesh.tp_group)
    return float((t[0] + replicated) ** 0.5)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return S.run_cases(_ranks, tmp_path_factory.mktemp("ds_tp"), world=TP * DP, timeout=300)


@pytest.mark.parametrize("case", list(CASES) + [CLIPPED])
def test_trajectory_equals_unsplit_reference(results, case):
    for v in S.case_values(results, case):
        assert v["vs_reference"] <= TOL, v
        assert v["module"] <= TOL, v
        assert v["k"] == [STEPS, STEPS], v


@pytest.mark.parametrize("case", list(CASES))
def test_stats_reduced_over_dp_times_tp(results, case):
    for v in S.case_values(results, case):
        assert v["weighted"] and v["reduced_over"] == [0, 1, 2, 3], v
        assert len(v["zero_dp"]) == DP, v  # the ZeRO partitions stay over the data-parallel group


@pytest.mark.parametrize("case", list(CASES))
def test_one_stats_all_reduce_per_gradient_evaluation(results, case):
    per_step = 1 if case.endswith("one_pass") else 2
    for v in S.case_values(results, case):
        assert v["stats_reduces"] == per_step, v


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("one_pass")])
def test_ascent_scale_uses_unsplit_norm(results, case):
    for v in S.case_values(results, case):
        for s in v["scales"]:
            assert s == pytest.approx(v["expected_scale"], rel=1e-6), v


def test_clipping_is_active(results):
    for v in S.case_values(results, CLIPPED):
        assert v["clip_moves_reference"] > 10 * TOL, v


def test_replicated_params_counted_twice_leave_the_reference(results):
    for v in S.case_values(results, COUNTED_TWICE):
        assert v["vs_reference"] > 10 * TOL, v
