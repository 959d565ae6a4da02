"""Bad optimizer inputs that torch accepts quietly: a tiny beta1 (refused at construction, it overflows
eval()), a misspelled group key (refused, naming the key it resembles), weight_decay / lr / rho far beyond
what trains (a warning at construction; the skipped-step warning names them as the likely cause)."""
from __future__ import annotations

import warnings

import pytest
import torch

from sharded_msam_sf.hyperparams import InvalidHyperparameter
from sharded_msam_sf.optimizer import AdamWMSAMScheduleFree
from tests.models import batch, one_step, tiny_mlp


def test_tiny_beta1_is_refused_at_construction():
    with pytest.raises(InvalidHyperparameter, match=r"beta parameter at index 0: 1e-300 .*overflows"):
        AdamWMSAMScheduleFree(tiny_mlp().parameters(), betas=(1e-300, 0.999))
    AdamWMSAMScheduleFree(tiny_mlp().parameters(), betas=(1e-6, 0.999))


def test_unknown_group_keys_are_refused():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'learning_rate' \(did you mean 'lr'\?\)"):
        AdamWMSAMScheduleFree([{"params": model.parameters(), "learning_rate": 0.1}])
    opt = AdamWMSAMScheduleFree([{"params": list(model.parameters())[:1]}])
    with pytest.raises(ValueError, match=r"'wieght_decay' \(did you mean 'weight_decay'\?\)"):
        opt.add_param_group({"params": list(model.parameters())[1:], "wieght_decay": 0.1})
    assert len(opt.param_groups) == 1
    # the keys torch and the optimizer keep are accepted (a group copied from another optimizer)
    AdamWMSAMScheduleFree([dict(g, params=list(model.parameters())) for g in opt.param_groups])


def test_extreme_values_warn_and_the_skip_names_the_cause():
    with pytest.warns(RuntimeWarning, match=r"group 0 has weight_decay=1e\+10 \(above 1\)"):
        AdamWMSAMScheduleFree(tiny_mlp().parameters(), weight_decay=1e10)
    model = tiny_mlp(seed=1)
    with pytest.warns(RuntimeWarning, match=r"lr=1e\+30"):
        opt = AdamWMSAMScheduleFree(model.parameters(), lr=1e30)
    opt.train()
    x, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            one_step(model, opt, x, y, "one_pass")
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert opt.skipped_steps > 0 and skips
    assert all("likely cause: group 0: lr=1e+30 (above 10)" in m for m in skips), skips
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary values: no warning
        AdamWMSAMScheduleFree(tiny_mlp().parameters(), lr=0.01, weight_decay=0.1, rho=2.0)
