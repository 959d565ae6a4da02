"""Tiny deterministic models and data shared by the single-process tests."""
from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, sizes=(5, 7, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(seed: int = 1, n: int = 16, d_in: int = 5, d_out: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def decay_groups(model: nn.Module, weight_decay: float = 0.1):
    """Two param groups: weight decay on matrices, none on biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_step(model, opt, x, y, mode: str = "one_pass") -> None:
    """One optimizer step of the MSAM loop (one_pass) or the seed's loop (two_pass)."""
    mse(model, x, y).backward()
    if mode == "two_pass":
        opt.move_to_ascent()
        mse(model, x, y).backward()
        opt.move_from_ascent()
    opt.step()
    opt.zero_grad()


def train_loop(model, opt, x, y, steps: int, mode: str = "one_pass", switch_at=None, batches=None):
    """The seed's loop (two_pass) or MSAM's (one_pass); ``switch_at``: an eval→train switch."""
    opt.train()
    for i in range(steps):
        if batches is not None:
            x, y = batches[i % len(batches)]
        one_step(model, opt, x, y, mode)
        if switch_at is not None and i == switch_at:
            opt.eval()
            with torch.no_grad():
                mse(model, x, y)
            opt.train()
    opt.eval()
    return flat(model)
