"""Wrap the meta model the way each engine does, on the simulated rank's device mesh.

- ``fsdp2``: ``fully_shard`` every decoder layer, then the root (torchtitan's order), 1-D mesh.
- ``hsdp``: the same on the 2-D ``(replicate, shard)`` mesh (``Replicate, Shard(0)``).
- ``fsdp2-tp`` / ``hsdp-tp``: tensor parallel on ``mesh["tp"]`` first (:data:`TP_PLAN`:
  q/k/v and gate/up Colwise, o/down Rowwise, the token embedding Rowwise over the vocab, the
  LM head Colwise, the RMSNorms SequenceParallel — replicated over tp), then ``fully_shard``
  over the data-parallel submesh. ``flatten=True`` (hsdp-tp) also makes the user-flattened
  ``(shard, tp)`` mesh (``mesh["shard", "tp"]._flatten()``) before the optimizer is built, so
  the reduction may take that group instead of the whole world.
- ``pp-tp``: this rank's pipeline stage only (its share of the decoder layers, the
  embedding on the first stage, the final norm and LM head on the last), tensor parallel as
  above, ``fully_shard`` over ``dp`` when the mesh has one; the optimizer gets
  ``pipeline_group=mesh["pp"].get_group()``.

Returns ``(model, root mesh, optimizer kwargs)``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .models import decoder_layers

__all__ = ["TP_PLAN", "wrap"]

TP_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise", "input_layernorm": "sequence", "post_attention_layernorm": "sequence",
}


def _styles():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel
    return dict(colwise=ColwiseParallel, rowwise=RowwiseParallel, sequence=SequenceParallel,
                Replicate=Replicate, Shard=Shard)


def _tensor_parallel(model: torch.nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module
    s = _styles()
    for layer in decoder_layers(model):
        plan = {name: s[style]() for name, style in TP_PLAN.items() if layer.get_submodule(name) is not None}
        parallelize_module(layer, tp_mesh, plan)
    top: Dict[str, Any] = {}
    inner = getattr(model, "model", None)
    if inner is not None and getattr(inner, "embed_tokens", None) is not None:
        top["model.embed_tokens"] = s["rowwise"](input_layouts=s["Replicate"](), output_layouts=s["Shard"](1))
    if inner is not None and getattr(inner, "norm", None) is not None:
        top["model.norm"] = s["sequence"]()
    if getattr(model, "lm_head", None) is not None:
        top["lm_head"] = s["colwise"](input_layouts=s["Shard"](1))
    if top:
        parallelize_module(model, tp_mesh, top)


def _fully_shard(model: torch.nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _keep_stage(model: torch.nn.Module, stage: int, stages: int) -> None:
    """Cut ``model`` down to pipeline stage ``stage`` of ``stages`` (in place)."""
    layers = decoder_layers(model)
    n = len(layers)
    if n < stages:
        raise ValueError(f"pp-tp: {n} decoder layers cannot fill {stages} pipeline stages")
    begin, end = stage * n // stages, (stage + 1) * n // stages
    for i in reversed(range(n)):
        if not begin <= i < end:
            del layers[i]
    inner = model.model
    if stage != 0:
        inner.embed_tokens = None
    if stage != stages - 1:
        inner.norm = None
        model.lm_head = None


def wrap(engine: str, model: torch.nn.Module, mesh, *, flatten: bool = False) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Wrap ``model`` in place for ``engine`` on ``mesh``; returns (model, optimizer kwargs)."""
    names = mesh.mesh_dim_names
    opt_kwargs: Dict[str, Any] = {}
    if engine in ("fsdp2", "hsdp"):
        _fully_shard(model, mesh)
    elif engine == "fsdp2-tp":
        _tensor_parallel(model, mesh["tp"])
        _fully_shard(model, mesh["dp"])
    elif engine == "hsdp-tp":
        _tensor_parallel(model, mesh["tp"])
        _fully_shard(model, mesh["replicate", "shard"])
        if flatten:
            mesh["shard", "tp"]._flatten()
    elif engine == "pp-tp":
        stage, stages = mesh.get_coordinate()[0], mesh.size(0)
        if getattr(model.config, "tie_word_embeddings", False) and stages > 1:
            raise ValueError("pp-tp: a model with tied embeddings (first and last stage share a weight) is not "
                             "simulated; use an untied config")
        _keep_stage(model, stage, stages)
        _tensor_parallel(model, mesh["tp"])
        if "dp" in names:
            _fully_shard(model, mesh["dp"])
        opt_kwargs["pipeline_group"] = mesh["pp"].get_group()
    else:
        raise ValueError(f"engine {engine!r} is not a device-mesh engine")
    return model, opt_kwargs
