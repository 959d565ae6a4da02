"""``"no_decay_bias_and_norm": true`` (the DeepSpeed JSON route's weight-decay groups): the same names as
``transformers.Trainer.get_decay_parameter_names``, the groups in the Trainer's order, the key validated,
and refused where the groups are built elsewhere. (The trajectory of the JSON route with it equals the
class route's: tests/test_hf_deepspeed.py.)"""
import pytest
import torch

from sharded_msam_sf.config import ConfigError, grouping_from_config, optimizer_kwargs_from_config
from sharded_msam_sf.deepspeed.decay_groups import decay_groups, decay_parameter_names


class RMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)              # a LayerNorm named without "norm": no decay by type
        self.input_layernorm = RMSNorm(4)            # by name: "layernorm"
        self.q_norm = RMSNorm(4)                     # "_norm."
        self.normalizer = torch.nn.Linear(4, 4, bias=False)  # "normalizer" is not a norm: decayed


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.norm = RMSNorm(4)                       # "(^|.)norm(.|$)"
        self.head = torch.nn.Linear(4, 2)
        self.scale = torch.nn.Parameter(torch.ones(1))  # a root parameter


def test_names_equal_the_hf_trainers():
    pytest.importorskip("transformers")
    from transformers import Trainer
    model = Model()
    hf = set(Trainer.get_decay_parameter_names(None, model))
    ours = decay_parameter_names(model)
    assert ours == hf
    assert "layers.0.normalizer.weight" in ours and "layers.0.ln.weight" not in ours and "norm.weight" not in ours


def test_groups_in_the_trainers_order():
    model = Model()
    named = dict(model.named_parameters())
    groups = decay_groups(model, model.parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = decay_parameter_names(model)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for n, p in named.items() if n in decayed]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for n, p in named.items() if n not in decayed]
    frozen = Model()
    frozen.head.bias.requires_grad_(False)
    assert sum(len(g["params"]) for g in decay_groups(frozen, None, 0.1)) == len(named) - 1  # trainable only


def test_groups_refuse_param_groups_and_foreign_tensors():
    model = Model()
    with pytest.raises(ValueError, match="given as param groups already"):
        decay_groups(model, [{"params": list(model.parameters())}], 0.1)
    with pytest.raises(ValueError, match="not the model's"):
        decay_groups(model, [torch.nn.Parameter(torch.zeros(2))], 0.1)


def test_the_key_is_validated_and_refused_where_groups_are_built_elsewhere():
    section = {"type": "AdamWMSAMScheduleFree", "params": {"weight_decay": 0.1, "no_decay_bias_and_norm": True}}
    assert grouping_from_config(section) == {"no_decay_bias_and_norm": True}
    assert optimizer_kwargs_from_config(section, grouping=True) == {"weight_decay": 0.1}
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.no_decay_bias_and_norm: only the DeepSpeed routes"):
        optimizer_kwargs_from_config(section)
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.no_decay_bias_and_norm: invalid value 'yes'"):
        grouping_from_config({"type": "AdamWMSAMScheduleFree", "params": {"no_decay_bias_and_norm": "yes"}})
    off = {"type": "AdamWMSAMScheduleFree", "params": {"no_decay_bias_and_norm": False}}
    assert optimizer_kwargs_from_config(off) == {} and grouping_from_config(off) == {"no_decay_bias_and_norm": False}
