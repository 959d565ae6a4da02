"""A GPT-style decoder: pre-norm blocks, causal attention via scaled_dot_product_attention.

Sizes range from a few hundred thousand parameters (the CPU default) to ~1.3B
(configs/job/gpt-1.3b-gpu.json). The token embedding is tied to the output head unless
``tie_embeddings`` is false (pipeline parallelism needs an own head on the last stage).
`Block` is the unit that FSDP wraps and that activation checkpointing recomputes. The forward is
three pieces, ``embed`` -> ``run_blocks`` -> ``head`` (+ ``lm_loss``), which the pipeline stages
of sharded_msam_sf.job.pipeline_parallel run one part each of.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v projections (so that tensor parallelism
    can split each of them by heads: sharded_msam_sf.job.tensor_parallel). The head count is read
    from the projections' local width, ``q(x).shape[-1] // head_dim``: ``n_head`` on one rank,
    ``n_head / tp`` under tensor parallelism."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, activation_checkpointing: bool = False):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied; a module of its own so ZeRO-3 gathers it
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation; residual projections scaled by 1/sqrt(2·n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (B, T, V), or the mean cross-entropy if targets are given."""
        logits = head(self, run_blocks(self, embed(self, idx), self.blocks))
        return logits if targets is None else lm_loss(logits, targets)


def embed(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings (with dropout) of ``model`` (a GPT or its first pipeline stage)."""
    t = idx.shape[1]
    if t > model.cfg.block_size:
        raise ValueError(f"sequence length {t} exceeds model.block_size {model.cfg.block_size}")
    pos = torch.arange(t, device=idx.device)
    return model.drop(model.wte(idx) + model.wpe(pos))


def run_blocks(model: nn.Module, x: torch.Tensor, blocks) -> torch.Tensor:
    """``blocks`` in order, recomputed in backward under ``model.activation_checkpointing``."""
    for block in blocks:
        if model.activation_checkpointing and model.training and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm and the output head: logits (B, T, V)."""
    return model.lm_head(model.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over all B x T positions (in fp32)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
