"""Pipeline parallelism for the job's GPT (``parallel.pp``, engine fsdp2), built with
``torch.distributed.pipelining`` on the ``pp`` dim of a pp × dp device mesh.

The GPT's ``n_layer`` blocks are split evenly over the ``pp`` stages (``GPTStage``): stage 0 holds
the embeddings and blocks ``[0, n_layer / pp)``, the last stage its blocks, the final LayerNorm and
the head. A stage keeps the GPT's attribute names (its blocks in a ``ModuleDict`` keyed by the global
block index), so its parameter names — the model state dict, the DCP checkpoint, the optimizer's
flattened state — are the full model's: every stage saves disjoint keys, the offline export reads
the whole model from the checkpoint, and the job's export merges the stages' weights on rank 0.
The head must not be tied to the token embedding (``model.tie_embeddings=false``): on two stages
one weight would be two parameters, counted twice in ``||m||`` and never given the sum of its
gradients.

Each stage is ``fully_shard``-ed over the mesh's ``dp`` dim (each block, then the stage); its
``PipelineStage`` communicates over the ``pp`` group. One schedule call (``ScheduleGPipe`` or
``Schedule1F1B``) per gradient evaluation runs the step's ``grad_accum`` micro-batches: the loss of
micro-batch ``m`` is the mean cross-entropy over its tokens and the schedule divides the stage's
gradients by the micro-batch count (``scale_grads``), FSDP2's reduce-scatter averages over dp, so the
gradient is the one of the mean loss over the global batch, as in the job without pipelining.

Per step (one gradient evaluation) each stage boundary carries, per micro-batch, one send/recv of
the (micro × block_size × n_embd) activation forward and one of its gradient backward; the
optimizer adds its one all-reduce of two float64 over all ranks (``pipeline_group=``:
sharded_msam_sf.backends.pipeline), gradient clipping one more (``tensor_parallel.clip_grad_norm_``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import GPT, embed, head, lm_loss, run_blocks

__all__ = ["make_mesh", "GPTStage", "make_schedule"]


def make_mesh(device_type: str, world_size: int, pp: int):
    """The pp × dp mesh: rank = pp_rank · dp + dp_rank (consecutive ranks hold one stage: the dp
    collectives inside a node, the stage-to-stage sends across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (pp, world_size // pp), mesh_dim_names=("pp", "dp"))


class GPTStage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of ``gpt`` (its modules, not copies; see the module docstring).
    Input: token ids (stage 0) or the previous stage's activations; output: the activations, or the
    logits on the last stage."""

    def __init__(self, gpt: GPT, stage: int, n_stages: int):
        super().__init__()
        n = len(gpt.blocks)
        if n % n_stages:
            raise ValueError(f"{n} blocks do not split evenly over {n_stages} pipeline stages")
        if n_stages > 1 and gpt.cfg.tie_embeddings:
            raise ValueError("pipeline stages need an untied head (tie_embeddings=False): the tied weight would "
                             "sit on the first and the last stage")
        per = n // n_stages
        self.cfg, self.activation_checkpointing = gpt.cfg, gpt.activation_checkpointing
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        if self.is_first:
            self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop
        self.blocks = nn.ModuleDict({str(i): gpt.blocks[i] for i in range(stage * per, (stage + 1) * per)})
        if self.is_last:
            self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = embed(self, x)
        x = run_blocks(self, x, self.blocks.values())
        return head(self, x) if self.is_last else x


def make_schedule(stage, name: str, n_microbatches: int):
    """The schedule of ``parallel.schedule`` over ``stage`` (a PipelineStage); loss: the mean
    cross-entropy of a micro-batch, the gradients divided by ``n_microbatches``."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stage, n_microbatches, loss_fn=lm_loss, scale_grads=True)
