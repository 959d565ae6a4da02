"""`python -m sharded_msam_sf.checkpoint to-universal`: a 2-rank ZeRO-2 checkpoint, resumed through
DeepSpeed's universal loader at 1 rank (ZeRO-2) equals the uninterrupted 2-rank run within fp32 round-off
(the reductions differ with the world size; bound 1e-6; measured 3.0e-8 one_pass, 1.5e-8
two_pass, printed); a ZeRO-3 engine cannot load
it (DeepSpeed's ZeRO-3 universal loader would drop z) and fails instead of resuming wrongly. Also: the
facade's `save_eval_weights` file equals the offline export of the same state bit for bit."""
from __future__ import annotations

import pytest
import torch

from tests.ds_scenarios import ds_config, ds_train, make_engine, master_weights, max_diff
from tests.harness import RanksFailed, run_ranks

pytestmark = pytest.mark.slow
SAVE, STEPS = 3, 6


def _teardown(engine) -> None:
    engine.destroy()  # the harness closes the process group


def _uninterrupted(rank, world, out, mode, stage):
    engine, opt = make_engine(ds_config(stage, sam_mode=mode, world=world))
    opt.train()
    ds_train(engine, opt, SAVE, mode)
    engine.save_checkpoint(out, tag="saved")
    ds_train(engine, opt, STEPS, mode, start=SAVE)
    w = master_weights(engine)
    x = opt.eval_state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    engine.save_checkpoint(out, tag="final")  # for the offline export, against the facade's live one
    opt.save_eval_weights(f"{out}/live_x")
    _teardown(engine)
    if rank == 0:  # (tensors through the harness's queue would outlive the rank's shared memory)
        torch.save({"y": w, "x": x, "groups": groups}, f"{out}/uninterrupted.pt")


def _resumed(rank, world, out, mode, stage):
    cfg = ds_config(stage, sam_mode=mode, world=world)
    cfg["checkpoint"] = {"load_universal": True}
    engine, opt = make_engine(cfg, seed=7)  # other initial weights: everything must come from the checkpoint
    path, _ = engine.load_checkpoint(out, tag="universal", load_optimizer_states=True, load_lr_scheduler_states=False)
    assert path is not None
    with opt._driver.param_groups_filled():
        assert all(g["train_mode"] and g["k"] == SAVE for g in opt.param_groups)  # the saved counters
    ds_train(engine, opt, STEPS, mode, start=SAVE)
    w = master_weights(engine)
    x = opt.eval_state_dict()
    with opt._driver.param_groups_filled():
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    _teardown(engine)
    if rank == 0:
        torch.save({"y": w, "x": x, "groups": groups}, f"{out}/resumed.pt")


@pytest.mark.parametrize("mode", ["one_pass", "two_pass"])
def test_universal_resume_at_another_world_size(tmp_path, mode):
    source, target = 2, 2
    from sharded_msam_sf.checkpoint import main
    from sharded_msam_sf.export import export
    from sharded_msam_sf.weights_io import load_weights
    run_ranks(_uninterrupted, 2, str(tmp_path), mode, source, timeout=300)
    full = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
    # the facade's save_eval_weights and the offline export of the same state: the same file
    offline = export(tmp_path / "final", tmp_path / "offline_x")
    assert (offline / "model.safetensors").read_bytes() == (tmp_path / "live_x" / "model.safetensors").read_bytes()
    assert load_weights(offline)[1]["step"] == load_weights(tmp_path / "live_x")[1]["step"] == STEPS
    assert main(["to-universal", str(tmp_path / "saved"), str(tmp_path / "universal")]) == 0
    folders = [p for p in (tmp_path / "universal" / "zero").iterdir() if p.is_dir()]
    assert folders and all((p / "z.pt").is_file() for p in folders)
    run_ranks(_resumed, 1, str(tmp_path), mode, target, timeout=300)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    dy, dx = max_diff(full["y"], got["y"]), max_diff(full["x"], got["x"])
    print(f"universal resume 2 ranks ZeRO-{source} -> 1 rank ZeRO-{target} ({mode}): max|dy| {dy:.2e} "
          f"max|dx| {dx:.2e}")
    assert dy <= 1e-6 and dx <= 1e-6
    for a, b in zip(full["groups"], got["groups"]):
        assert a["k"] == b["k"] == STEPS and a["train_mode"] == b["train_mode"]
        assert a["weight_sum"] == pytest.approx(b["weight_sum"], rel=1e-12)
    # a ZeRO-3 engine, whose universal loader would drop z, cannot load it
    with pytest.raises(RanksFailed, match="AssertionError|KeyError"):
        run_ranks(_resumed, 1, str(tmp_path), mode, 3, timeout=300)
