"""Weight-decay groups as the Hugging Face Trainer makes them, for the routes that get a flat
parameter list (the DeepSpeed JSON route: ``"no_decay_bias_and_norm": true`` in the optimizer
section's params).

``transformers.Trainer.get_decay_parameter_names`` (transformers 5.x) decays every parameter except

- those inside a ``torch.nn.LayerNorm`` module (below the root), and
- those whose full name, lower-cased, matches ``bias``, ``layernorm``, ``rmsnorm``,
  ``(^|.)norm($|.)`` or ``_norm($|.)`` (so ``model.norm.weight``, ``ln_f.bias``,
  ``input_layernorm.weight``, ``q_norm.weight``; not ``normalizer.weight``).

:func:`decay_groups` gives its two groups, in its order: ``[{"params": decayed, "weight_decay": wd},
{"params": the others, "weight_decay": 0.0}]`` (an empty group left out, as DeepSpeed drops it).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Set

import torch

__all__ = ["NO_DECAY_PATTERNS", "decay_parameter_names", "decay_groups"]

NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_PATTERNS = [re.compile(p) for p in NO_DECAY_PATTERNS]


def decay_parameter_names(model: torch.nn.Module) -> Set[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters that take weight decay."""
    in_norm: Set[str] = set()
    for prefix, module in model.named_modules():
        if prefix and isinstance(module, torch.nn.LayerNorm):
            in_norm.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
    return {n for n, _ in model.named_parameters()
            if n not in in_norm and not any(p.search(n.lower()) for p in _PATTERNS)}


def decay_groups(model: torch.nn.Module, params: Optional[Iterable[Any]], weight_decay: float) -> List[Dict[str, Any]]:
    """``params`` (tensors of ``model``; None: its trainable parameters) split into the decayed group
    (``weight_decay``) and the rest (0.0), in ``model.named_parameters()`` order. Raises ``ValueError``
    for param-group dicts (they are groups already) and for tensors that are not ``model``'s."""
    named = list(model.named_parameters())
    if params is None:
        wanted = {id(p) for _, p in named if p.requires_grad}
    else:
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise ValueError("no_decay_bias_and_norm: the parameters were given as param groups already; pass the "
                             "model's parameters as a list, or drop no_decay_bias_and_norm and set weight_decay per group")
        wanted = {id(p) for p in params}
        unknown = len(wanted - {id(p) for _, p in named})
        if unknown:
            raise ValueError(f"no_decay_bias_and_norm: {unknown} of the parameters are not the model's (their names "
                             f"decide the groups)")
    decayed = decay_parameter_names(model)
    groups = [{"params": [p for n, p in named if id(p) in wanted and n in decayed], "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) in wanted and n not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
