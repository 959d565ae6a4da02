"""The hyperparameters of one update, in the one layout the compiled and Triton kernels share.

The kernels take the scalars as one float64 tensor on the params' device (Python floats
would be traced as symbolic values, and some ops recompile on their value). Its slots
are named by :class:`Slot`; every kernel reads them by name (``sc[Slot.LR]``,
:func:`unpack` for the compiled kernels, the ``S_*`` constants of the Triton kernels),
never by a bare index, and :func:`pack` takes exactly one value per slot by name. So a
new field can be inserted anywhere in :class:`Slot`: the layout check refuses a gap or
a duplicate, and :func:`pack` refuses a missing or unknown name.

The values, from the arguments of one step (``ALGORITHM.md``)::

    LR = γ_t          COEF_Y = γ_t·(β1·(1 − c) − 1)   BETA2, ONE_MINUS_BETA2 = β2, 1 − β2
    BC2 = 1 − β2^t    EPS = eps    WD = λ    CKP1 = c
    BETA_M, ONE_MINUS_BETA_M = β_m, 1 − β_m (0, 0 without a momentum fold)
    NEG_REMOVE = −s_old (the ascent removed)   APPLY = s_new (the ascent applied)
"""
from __future__ import annotations

from collections import namedtuple
from enum import IntEnum
from typing import Dict, Optional, Type

import torch
from torch import Tensor

__all__ = ["Slot", "Scalars", "check_layout", "pack", "unpack", "step_scalars"]


class Slot(IntEnum):
    """Position of each hyperparameter in the scalar tensor."""
    LR = 0
    COEF_Y = 1
    BETA2 = 2
    ONE_MINUS_BETA2 = 3
    BC2 = 4
    EPS = 5
    WD = 6
    CKP1 = 7
    BETA_M = 8
    ONE_MINUS_BETA_M = 9
    NEG_REMOVE = 10
    APPLY = 11


def check_layout(layout: Type[IntEnum] = Slot) -> None:
    """A layout must number its slots 0, 1, …, n−1, each once (no gap, no alias)."""
    values = [int(s) for s in layout.__members__.values()]
    if sorted(values) != list(range(len(values))):
        raise ValueError(f"scalar layout {layout.__name__}: slots must be numbered 0..{len(values) - 1} once each, "
                         f"got {dict((n, int(s)) for n, s in layout.__members__.items())}")


check_layout(Slot)

# the unpacked view, fields in slot order (lower-case slot names)
Scalars = namedtuple("Scalars", [s.name.lower() for s in sorted(Slot)])


def pack(device: Optional[torch.device] = None, layout: Type[IntEnum] = Slot, **values: float) -> Tensor:
    """The float64 scalar tensor: ``values`` by lower-case slot name, exactly one per slot."""
    names = {s.name.lower(): int(s) for s in layout}
    missing = [n for n in names if n not in values]
    unknown = [n for n in values if n not in names]
    if missing or unknown:
        raise ValueError(f"scalar layout {layout.__name__}: missing {missing}, unknown {unknown}")
    row = [0.0] * len(names)
    for name, value in values.items():
        row[names[name]] = float(value)
    t = torch.tensor(row, dtype=torch.float64)
    return t if device is None else t.to(device, non_blocking=True)


def unpack(sc: Tensor) -> Scalars:
    """The named view of a scalar tensor (works inside ``torch.compile``)."""
    return Scalars(*sc.unbind(0))


def step_scalars(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, ckp1: float,
                 bias_correction2: float, beta_m: Optional[float], remove_scale: float,
                 apply_scale: float) -> Dict[str, float]:
    """The slot values of one update, from the step's arguments (see the module table)."""
    return dict(lr=lr, coef_y=lr * (beta1 * (1.0 - ckp1) - 1.0), beta2=beta2, one_minus_beta2=1.0 - beta2,
                bc2=bias_correction2, eps=eps, wd=weight_decay, ckp1=ckp1,
                beta_m=0.0 if beta_m is None else beta_m, one_minus_beta_m=0.0 if beta_m is None else 1.0 - beta_m,
                neg_remove=-remove_scale, apply=apply_scale)
