"""The offline x export (`python -m sharded_msam_sf.export`) on single-process and DCP checkpoints, the
safetensors writer/reader, and bad inputs. Bound: x equals the live `optimizer.eval()` bit for bit (the
same elementwise ops on the same values; elementwise CPU ops give the same bits whatever the layout).
The DeepSpeed and main-job checkpoints: tests/test_export_job.py."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from sharded_msam_sf.export import ExportError, export, main, read_x
from sharded_msam_sf.optimizer import AdamWMSAMScheduleFree
from sharded_msam_sf.weights_io import load_weights, save_weights
from tests.models import batch, one_step, tiny_mlp


def trained(mode: str, steps: int = 3, eval_mode: bool = False):
    model = tiny_mlp(seed=3)
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.05, betas=(0.8, 0.99), warmup_steps=1, sam_mode=mode,
                                rho=0.1)
    opt.train()
    x, y = batch()
    for _ in range(steps):
        one_step(model, opt, x, y, mode)
    if eval_mode:
        opt.eval()
    return model, opt


def live_x(model, opt) -> dict:
    was_train = opt.param_groups[0]["train_mode"]
    opt.eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if was_train:
        opt.train()
    return sd


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


@pytest.mark.parametrize("mode,eval_mode", [("one_pass", False), ("two_pass", False), ("one_pass", True)])
def test_single_process_checkpoint_gives_live_x(tmp_path, mode, eval_mode):
    model, opt = trained(mode, eval_mode=eval_mode)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pt")
    y_before = {k: v.clone() for k, v in model.state_dict().items()}
    want = live_x(model, opt)
    if not eval_mode:  # the checkpoint really holds something else than x
        assert any(not torch.equal(want[k], y_before[k]) for k in want)
    out = export(tmp_path / "state.pt", tmp_path / "x")
    got, meta = load_weights(out)
    assert_bit_equal(want, got)
    assert meta["weights"] == "x" and meta["format"] == "sharded_msam_sf.weights/1"
    fresh = tiny_mlp(seed=9)
    fresh.load_state_dict(got)  # loads into the model as it is


def test_dcp_checkpoint_without_process_group_gives_live_x(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model, opt = trained("one_pass")
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    want = live_x(model, opt)
    sd, _ = read_x(tmp_path / "ckpt")
    assert_bit_equal(want, sd)


def test_safetensors_round_trip_and_old_pt_exports(tmp_path):
    model, opt = trained("one_pass")
    sd = live_x(model, opt)
    sd["tied"] = sd["0.weight"]  # tied names are stored under each name
    save_weights(sd, tmp_path / "e", {"weights": "x", "step": 3})
    got, meta = load_weights(tmp_path / "e")
    assert_bit_equal(sd, got)
    assert meta["step"] == 3 and json.loads((tmp_path / "e" / "export.json").read_text())["weights"] == "x"
    save_weights(sd, tmp_path / "e", {"weights": "x", "step": 4})  # replaced whole
    assert load_weights(tmp_path / "e")[1]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary left
    torch.save({"model": sd, "meta": {"step": 3}}, tmp_path / "model.pt")
    with pytest.warns(DeprecationWarning, match="old torch.save export"):
        old, old_meta = load_weights(tmp_path / "model.pt")
    assert_bit_equal(sd, old) and old_meta == {"step": 3}


def test_the_file_does_not_depend_on_key_order(tmp_path):
    model, opt = trained("one_pass")
    sd = live_x(model, opt)
    save_weights(sd, tmp_path / "a", {"weights": "x"})
    save_weights(dict(reversed(list(sd.items()))), tmp_path / "b", {"weights": "x"})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_hf_config_is_written_alongside(tmp_path):
    model, opt = trained("one_pass")
    ck = tmp_path / "ckpt"
    ck.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ck / "state.pt")
    (ck / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    out = export(ck, tmp_path / "x")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ bad input
def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_truncated_file_is_named_and_nothing_written(tmp_path):
    model, opt = trained("one_pass")
    f = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ExportError, match="cannot read checkpoint file .*state.pt.*truncated"):
        export(f, tmp_path / "x")
    _nothing_written(tmp_path)


def test_other_optimizer_is_refused(tmp_path):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters())
    x, y = batch()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    f = tmp_path / "adamw.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
    with pytest.raises(ExportError, match="adamw.pt.*not a checkpoint of AdamWMSAMScheduleFree"):
        export(f, tmp_path / "x")
    _nothing_written(tmp_path)


def test_mismatched_model_is_refused(tmp_path):
    model, opt = trained("one_pass")
    other = tiny_mlp(sizes=(5, 6, 3))
    f = tmp_path / "mixed.pt"
    torch.save({"model": other.state_dict(), "optimizer": opt.state_dict()}, f)
    with pytest.raises(ExportError, match="mixed.pt: '0.weight' has shape .* a mismatched model"):
        export(f, tmp_path / "x")
    _nothing_written(tmp_path)


def test_code_in_a_file_is_refused(tmp_path):
    class Planted:
        def __reduce__(self):
            return (print, ("planted",))
    f = tmp_path / "state.pt"
    torch.save({"model": {}, "optimizer": Planted()}, f)
    with pytest.raises(ExportError, match="state.pt"):
        export(f, tmp_path / "x")


def test_corrupt_dcp_data_file_is_named(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model, opt = trained("one_pass")
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    data = next((tmp_path / "ckpt").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ExportError, match="cannot read .* from .*ckpt"):
        export(tmp_path / "ckpt", tmp_path / "x")
    _nothing_written(tmp_path)


def test_cli_reports_errors_with_exit_code_1(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    model, opt = trained("one_pass")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(tmp_path / "s.pt"), "--out", str(tmp_path / "x"), "--quiet"]) == 0
    assert_bit_equal(live_x(model, opt), load_weights(tmp_path / "x")[0])


def test_hf_model_checkpoint_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")  # an optional dependency of the users who have HF models
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = AdamWMSAMScheduleFree(model.parameters(), lr=0.01, warmup_steps=1, rho=0.05)
    opt.train()
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ck = tmp_path / "ckpt"
    ck.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ck / "state.pt")
    cfg.save_pretrained(ck)  # config.json alongside: an HF model
    want = live_x(model, opt)
    out = export(ck, tmp_path / "x")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    got = loaded.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
