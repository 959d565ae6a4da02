"""Pipeline-parallel scenarios (``torch.distributed.pipelining``) for tests/test_pipeline.py.

Four gloo ranks on a ``(dp=2, pp=2)`` mesh (rank = 2·dp + pp). The model of
:mod:`tests.sharded_common` is split in two stages: stage 0 is ``Linear(4, 7)``, Tanh and a
parameter that no forward uses (it never gets a gradient); stage 1 is ``Linear(7, 3)``,
Tanh, ``Linear(3, 1)``. Each rank builds its stage by hand (``PipelineStage``) and one
optimizer over it, with ``pipeline_group=`` the mesh's pp group. Layouts:

- ``pp``: the stages as they are (the two dp rows run two independent pipelines on the
  full global batch: the optimizer's all-reduce must stay inside each pipeline);
- ``pp_ddp``: each stage ``DistributedDataParallel`` over the mesh's dp group, each dp rank
  on its slice of the global batch, ``model=`` the DDP stage (replicas = 2);
- ``pp_fsdp2``: each stage ``fully_shard`` on the 1-D dp submesh.

The loss is the mean over a microbatch (``mse``) and the schedule divides the stage's
gradients by the number of microbatches (``scale_grads=True``), so the gradient is the one of
the mean over this rank's batch, as in :func:`tests.sharded_common.run_loop`'s control.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from sharded_msam_sf import AdamWMSAMScheduleFree
from tests import sharded_common as C

LAYOUTS = ("pp", "pp_ddp", "pp_fsdp2")
SCHEDULES = {"gpipe": 2, "1f1b": 4}   # schedule -> microbatches (1F1B needs at least one per stage)
N_STAGES = 2


class Head(nn.Module):
    """Stage 0: ``tanh(Linear(4, 7)(x))``, and ``spare``, which no forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C.D_IN, 7)
        self.spare = nn.Parameter(torch.linspace(-1.0, 1.0, 5))

    def forward(self, x):
        return torch.tanh(self.lin(x))


def make_full(seed: int = 3) -> nn.Sequential:
    """The whole model (the single-process control): ``Sequential(Head, tail)``."""
    torch.manual_seed(seed)
    return nn.Sequential(Head(), nn.Sequential(nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)))


class Mesh:
    """This rank's place on the (dp, pp) mesh and its groups (built once per rank process)."""

    def __init__(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh("cpu", (2, N_STAGES), mesh_dim_names=("dp", "pp"))
        self.pp, self.dp = self.mesh["pp"].get_local_rank(), self.mesh["dp"].get_local_rank()
        self.pp_group, self.dp_group = self.mesh["pp"].get_group(), self.mesh["dp"].get_group()
        self.last_stage_rank = dist.get_process_group_ranks(self.pp_group)[-1]

    def dp_size(self, layout: str) -> int:
        return 1 if layout == "pp" else 2

    def dp_rank(self, layout: str) -> int:
        return 0 if layout == "pp" else self.dp


class Pipeline:
    """This rank's stage of ``full`` (a copy), wrapped for ``layout``, with its schedule."""

    def __init__(self, mesh: Mesh, layout: str, schedule: str, full: nn.Sequential) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.mesh, self.layout = mesh, layout
        self.part = copy.deepcopy(full[mesh.pp])
        self.module = self.part
        if layout == "pp_ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.module = DDP(self.part, process_group=mesh.dp_group, find_unused_parameters=True)
        elif layout == "pp_fsdp2":
            from torch.distributed.fsdp import fully_shard
            fully_shard(self.part, mesh=mesh.mesh["dp"])
        elif layout != "pp":
            raise ValueError(layout)
        self.stage = PipelineStage(self.module, mesh.pp, N_STAGES, torch.device("cpu"), group=mesh.pp_group)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.schedule = cls(self.stage, SCHEDULES[schedule], loss_fn=lambda out, y: ((out - y) ** 2).mean())

    def backward(self, x, y) -> None:
        """One schedule run: every microbatch's forward and backward; the grads of the batch mean."""
        if self.mesh.pp == 0:
            self.schedule.step(x)
        else:
            self.schedule.step(target=y)

    def evaluate(self, x, y) -> float:
        """The eval loss through the pipeline (forward only), sent from the last stage to all."""
        losses: list = []
        if self.mesh.pp == 0:
            self.schedule.eval(x)
        else:
            self.schedule.eval(target=y, losses=losses)
        out = [float(torch.stack(losses).mean()) if losses else None]
        dist.broadcast_object_list(out, src=self.mesh.last_stage_rank, group=self.mesh.pp_group)
        return out[0]

    def loop_kwargs(self) -> dict:
        return dict(backward=self.backward, evaluate=self.evaluate)


def poisons_here(mesh: Mesh, layout: str) -> bool:
    """Where the NaN goes: stage 1 of each independent pipeline (``pp``), else one rank (pp 1, dp 0),
    after the gradient sync, so only the flag can make the other ranks skip."""
    return mesh.pp == 1 and (layout == "pp" or mesh.dp == 0)


def rho_free_first_and_uneven(groups: list) -> list:
    """Other param groups: the decay group without the ascent (rho = 0) first, then the no-decay
    params split by size (numel > 5 or not, empty groups dropped): stage 0 gets 3 groups, stage 1
    gets 2, the whole model 3; each param keeps its hyperparameters, so the trajectory is the same."""
    decay, rest = groups
    split = [[p for p in rest["params"] if p.numel() > 5], [p for p in rest["params"] if p.numel() <= 5]]
    return [dict(decay, rho=0.0)] + [dict(rest, params=ps) for ps in split if ps]


def measure(mesh: Mesh, layout: str, schedule: str, mode: str, *, steps: int = 6, switch_at: int = 2,
            nan_at: Optional[int] = 4, opt_kwargs: Optional[Callable[[Pipeline], dict]] = None,
            regroup: Optional[Callable[[list], list]] = None) -> dict:
    """The pipeline run and the single-process control on the same global batches: what
    :data:`tests.sharded_common.EQUIVALENCE_CHECKS` compares, for this rank's stage.
    ``opt_kwargs(pipe)`` (default: ``pipeline_group=`` the pp group, ``model=`` a DDP stage);
    ``regroup(groups)`` changes both runs' (decay, no decay) param groups."""
    base = make_full()
    ref = copy.deepcopy(base)
    pipe = Pipeline(mesh, layout, schedule, base)
    kw = opt_kwargs(pipe) if opt_kwargs is not None else default_kwargs(pipe)
    groups, _ = C.param_groups(layout, pipe.part, ref)
    groups = regroup(groups) if regroup is not None else groups
    out_groups = len(groups)
    opt = AdamWMSAMScheduleFree(groups, sam_mode=mode, **C.HP, **kw)
    rec, ref_rec = {}, {}
    nan_fn = C._nan_into(opt, dist.get_rank(), dist.get_rank()) if poisons_here(mesh, layout) else None
    C.run_loop(pipe.module, opt, mode=mode, steps=steps, dp_rank=mesh.dp_rank(layout), dp_size=mesh.dp_size(layout),
               switch_at=switch_at, nan_at=nan_at, nan_fn=nan_fn, record=rec, final_eval=False, **pipe.loop_kwargs())

    def ref_nan(step):
        ref[0].lin.weight.grad.view(-1)[0] = float("nan")
    ref_opt = C.reference_run(layout, pipe.part, ref, mode=mode, steps=steps, switch_at=switch_at, nan_at=nan_at,
                              nan_fn=ref_nan, record=ref_rec, final_eval=False, regroup=regroup)
    out = dict(norm=C.global_norm(opt), ref_norm=C.reference_norm(ref_opt), scales=rec["scale"],
               ref_scales=ref_rec["scale"], steps=steps, skipped=opt.skipped_steps, ref_skipped=ref_opt.skipped_steps,
               expected_skips=0 if nan_at is None else 1, eval_loss=rec["eval_loss"],
               ref_eval_loss=ref_rec["eval_loss"], backend=repr(opt.backend), n_groups=out_groups)
    opt.eval()      # x on every stage
    ref_opt.eval()
    theirs = {k: v.detach().float() for k, v in ref[mesh.pp].state_dict().items()}
    out["diff"] = C.max_abs_diff(C.full_weights(pipe.part), theirs)
    out["moved"] = C.max_abs_diff(theirs, {k: v.detach().float() for k, v in base[mesh.pp].state_dict().items()})
    out["spare_state"] = sorted(opt.state.get(pipe.part.spare, {})) if mesh.pp == 0 else []
    return out


def default_kwargs(pipe: Pipeline) -> dict:
    """``pipeline_group=`` the pp group; ``model=`` the stage's DDP module under ``pp_ddp``."""
    return dict(pipeline_group=pipe.mesh.pp_group, **({"model": pipe.module} if pipe.layout == "pp_ddp" else {}))


def collectives(mesh: Mesh, layout: str, schedule: str) -> Dict[str, dict]:
    """:func:`tests.sharded_common.measure_collectives` on fresh pipelines of ``layout``."""
    pipes: Dict[int, Pipeline] = {}

    def setup():
        pipe = Pipeline(mesh, layout, schedule, make_full(seed=5))
        pipes[id(pipe.module)] = pipe
        return pipe.module, pipe.loop_kwargs()
    out = C.measure_collectives(layout, dist.get_rank(), dist.get_world_size(), dp_rank=mesh.dp_rank(layout),
                                dp_size=mesh.dp_size(layout), setup=setup,
                                opt_kwargs=lambda module: default_kwargs(pipes[id(module)]))
    for m in out.values():
        m["stats_shape"] = (2,)   # [Σ_g sumsq_g, flag]: see sharded_msam_sf.backends.pipeline
    return out
