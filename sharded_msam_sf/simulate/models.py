"""The simulated model: a preset Llama shape or an HF ``config.json``, built on the meta device.

Presets (the published configs' shapes; no weights are read, nothing is downloaded):

=============  ======  =====  ======  =====  ====  ======  =====================
preset         hidden  inter  layers  heads  kv    vocab   source
=============  ======  =====  ======  =====  ====  ======  =====================
``llama-1b``   2048    8192   16      32     8     128256  Llama-3.2-1B (tied embeddings)
``llama-7b``   4096    11008  32      32     32    32000   Llama-2-7B
``llama-13b``  5120    13824  40      40     40    32000   Llama-2-13B
``llama-70b``  8192    28672  80      64     8     32000   Llama-2-70B
=============  ======  =====  ======  =====  ====  ======  =====================

``--model-config PATH`` takes any causal LM that transformers can build from its config
(``AutoConfig.for_model(config["model_type"], **config)`` then
``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``). ``layers`` overrides
``num_hidden_layers`` (the tests use 2 layers of the real 7B/70B shapes). Parameters are fp32
(FSDP2's sharded params are the fp32 masters; a mixed-precision policy only changes the
all-gathered copies).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch

__all__ = ["PRESETS", "load_config", "build_meta_model", "decoder_layers", "param_count"]

_LLAMA = dict(model_type="llama", hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5)
PRESETS: Dict[str, Dict[str, Any]] = {
    "llama-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     head_dim=64),
    "llama-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


def load_config(preset: Optional[str] = None, path: Optional[str] = None,
                layers: Optional[int] = None) -> Dict[str, Any]:
    """The config dict of a preset or of an HF ``config.json`` (``layers``: num_hidden_layers)."""
    if (preset is None) == (path is None):
        raise ValueError("give exactly one of --model (a preset) and --model-config (an HF config.json)")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown --model {preset!r} (valid: {', '.join(PRESETS)})")
        cfg = dict(PRESETS[preset])
    else:
        with open(path) as f:
            cfg = json.load(f)
        if "model_type" not in cfg:
            raise ValueError(f"{path}: an HF config.json needs 'model_type' (e.g. \"llama\")")
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    return cfg


def build_meta_model(cfg: Dict[str, Any], device: str = "meta") -> torch.nn.Module:
    """The causal LM of ``cfg`` on ``device`` (meta: no memory), fp32 params."""
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = dict(cfg)
    config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for Llama-like models, ``blocks`` for the job's GPT)."""
    for path in ("model.layers", "blocks", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: no list of decoder layers found (looked for model.layers, "
                     "transformer.h, ...)")


def param_count(model: torch.nn.Module) -> int:
    """P: the elements of every distinct parameter (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
