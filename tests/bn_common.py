"""A small CNN with BatchNorm, its data and the exact-statistics oracle of the BatchNorm tests."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

C_IN, SIDE, CLASSES = 3, 8, 4


class CNN(nn.Module):
    """conv → BN2d → ReLU → conv → BN2d → ReLU → pool → Linear → BN1d → LayerNorm → head, plus a BatchNorm
    without running statistics (``track_running_stats=False``): nothing of it may change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.free = nn.BatchNorm1d(8, track_running_stats=False)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.fc(x.mean(dim=(2, 3))))
        return self.head(self.free(self.ln(x)))


def make_model(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return CNN()


def data(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images whose class shifts the mean of one channel and scales another (so BN statistics matter)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, C_IN, SIDE, SIDE, generator=g)
    x[:, 0] += (y.float() - 1.5).view(-1, 1, 1)
    x[:, 1] *= (1.0 + y.float()).view(-1, 1, 1) * 0.5
    return x * 3.0 + 2.0, y


def batches(n_batches: int, size: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(n_batches * size, seed)
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n_batches)]


def train(model: nn.Module, opt, steps: int = 30, size: int = 16) -> None:
    """``steps`` optimizer steps in train mode (one_pass: the plain loop; two_pass: the SAM loop)."""
    opt.train()
    model.train()
    for x, y in batches(steps, size, seed=1):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if opt.sam_mode == "two_pass":
            opt.move_to_ascent()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.move_from_ascent()
        opt.step()
        opt.zero_grad()


def exact_stats(model: nn.Module, batch_list) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The oracle: every tracked BatchNorm's input, captured in train-mode forwards of ``batch_list``,
    concatenated; its float64 mean and unbiased variance per channel (one batch of everything seen)."""
    captured: Dict[str, List[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            def hook(mod, args, name=name):
                x = args[0].detach().double()
                captured.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))
            hooks.append(m.register_forward_pre_hook(hook))
    was = model.training
    model.train()
    with torch.no_grad():
        for x, _ in batch_list:
            model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return {k: (torch.cat(v, 1).mean(1), torch.cat(v, 1).var(1, unbiased=True)) for k, v in captured.items()}


def running(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]:
    return {name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
            for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


@torch.no_grad()
def val_loss(model: nn.Module, n: int = 256) -> float:
    x, y = data(n, seed=99)
    was = model.training
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y).item()
    model.train(was)
    return loss
