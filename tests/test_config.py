"""The optimizer section of a DeepSpeed-style config: valid sections and errors that name the key."""
import pytest

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.config import ConfigError, is_our_optimizer, optimizer_kwargs_from_config

import torch


def test_valid_section_gives_kwargs_the_optimizer_accepts():
    section = {"type": "AdamWMSAMScheduleFree",
               "params": {"lr": 0.0025, "rho": 1.0, "sam_mode": "one_pass", "weight_decay": 0.1,
                          "betas": [0.9, 0.99], "eps": 1e-8, "warmup_steps": 5, "r": 0.0,
                          "weight_lr_power": 2.0, "ascent_beta": None, "foreach": None}}
    kw = optimizer_kwargs_from_config(section)
    assert kw["betas"] == (0.9, 0.99) and kw["rho"] == 1.0 and kw["warmup_steps"] == 5
    opt = AdamWMSAMScheduleFree([torch.nn.Parameter(torch.zeros(3))], **kw)
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_empty_params_and_type_spelling():
    assert optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree"}) == {}
    assert optimizer_kwargs_from_config({"type": "adamw_msam_schedulefree", "params": {}}) == {}
    assert is_our_optimizer({"type": "AdamWMSAMScheduleFree"})
    assert not is_our_optimizer({"type": "AdamW"})


@pytest.mark.parametrize("section, key", [
    ({"type": "AdamWMSAMScheduleFree", "params": {"rhoo": 1.0}}, "optimizer.params.rhoo: unknown key"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"rho": -1.0}}, "optimizer.params.rho: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"lr": "fast"}}, "optimizer.params.lr: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"sam_mode": "three_pass"}}, "optimizer.params.sam_mode: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"betas": [0.0, 0.999]}}, "optimizer.params.betas: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"warmup_steps": 1.5}}, "optimizer.params.warmup_steps: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"foreach": 1}}, "optimizer.params.foreach: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"fused": "yes"}}, "optimizer.params.fused: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"state_dtype": "float16"}}, "optimizer.params.state_dtype: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": {"lr": float("nan")}}, "optimizer.params.lr: invalid value"),
    ({"type": "AdamWMSAMScheduleFree", "params": [1]}, "optimizer.params: must be a JSON object"),
    ({"params": {"lr": 0.1}}, "optimizer.type: missing"),
    ({"type": "AdamW", "params": {}}, "optimizer.type: 'AdamW' is not"),
    ({"type": "AdamWMSAMScheduleFree", "param": {}}, "optimizer.param: unknown key"),
    ([], "optimizer: must be a JSON object"),
])
def test_errors_name_the_key(section, key):
    with pytest.raises(ConfigError) as err:
        optimizer_kwargs_from_config(section)
    assert str(err.value).startswith(key), str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid: lr, betas, eps"):
        optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree", "params": {"rhoo": 1.0}})


def test_fused_and_state_dtype_reach_the_optimizer():
    kw = optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree",
                                       "params": {"fused": False, "state_dtype": "bfloat16"}})
    assert kw == {"fused": False, "state_dtype": torch.bfloat16}
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamWMSAMScheduleFree([p], **kw)
    opt.train()
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["z"].dtype == torch.bfloat16
    assert optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree",
                                         "params": {"state_dtype": None}}) == {"state_dtype": None}


@pytest.mark.parametrize("params, key", [
    ({"eps": float("inf")}, "optimizer.params.eps: invalid value"),
    ({"lr": True}, "optimizer.params.lr: invalid value"),
    ({"rho": True}, "optimizer.params.rho: invalid value"),
    ({"betas": [0.9, False]}, "optimizer.params.betas: invalid value"),
    ({"weight_decay": True}, "optimizer.params.weight_decay: invalid value"),
    ({"fused": True, "foreach": True}, "optimizer.params: Invalid fused/foreach"),
])
def test_config_uses_the_optimizers_validator(params, key):
    """The schema calls hyperparams.check/validate: what the optimizer refuses, the config refuses."""
    with pytest.raises(ConfigError) as err:
        optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree", "params": params})
    assert str(err.value).startswith(key), str(err.value)
    with pytest.raises(ValueError, match="Invalid"):
        AdamWMSAMScheduleFree([torch.nn.Parameter(torch.zeros(3))], **{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in params.items()})


def test_python_values_pass_as_the_optimizer_takes_them():
    """A config dict built in Python may hold what the optimizer accepts beyond JSON (a tuple of betas,
    a 0-d tensor lr, a torch dtype): the schema's types do not refuse them, hyperparams.check decides."""
    kw = optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree",
                                       "params": {"lr": torch.tensor(0.01), "betas": (0.9, 0.95),
                                                  "state_dtype": torch.bfloat16}})
    assert kw["betas"] == (0.9, 0.95) and kw["state_dtype"] is torch.bfloat16 and float(kw["lr"]) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.state_dtype: invalid value"):
        optimizer_kwargs_from_config({"type": "AdamWMSAMScheduleFree", "params": {"state_dtype": torch.float16}})


def test_schema_of_the_section():
    from sharded_msam_sf.config import OPTIMIZER_PARAMS, OptimizerSection
    schema = OptimizerSection.model_json_schema()
    params = schema["$defs"]["OptimizerParams"]
    # (no_decay_bias_and_norm is validated but not in the schema: the main job's config embeds it and refuses the key)
    assert list(params["properties"]) == list(OPTIMIZER_PARAMS) and params["additionalProperties"] is False
    assert params["properties"]["betas"]["type"] == "array" and params["properties"]["lr"]["type"] == "number"
