"""The simulation cases of ``tests/test_simulate.py``, run in one subprocess per group (``python -m
tests.simulate_cases GROUP``), printing one JSON object: case name -> report (or error text).

Models are 2-layer Llamas with the real 7B / 70B layer shapes (hidden 4096 / 8192, the real MLP
widths, heads and vocabulary), built on the meta device; ZeRO's DeepSpeed run uses a tiny Llama
(DeepSpeed needs real tensors). The fake group is torn down and rebuilt between cases."""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 250, "max_position_embeddings": 64,
        "tie_word_embeddings": False}


def _cfg(name: str, layers: int = 2):
    from sharded_msam_sf.simulate.models import load_config
    return TINY if name == "tiny" else load_config(name, layers=layers)


def _mesh(model, engine, n, rank, mesh=None, **kw):
    from sharded_msam_sf.simulate import simulate
    r = simulate(_cfg(model), engine, n, rank, mesh=mesh, **kw)
    if "all_ranks" in r:
        per = r["all_ranks"].pop("state_bytes_per_rank")
        r["all_ranks"]["rank_state_bytes"] = per[rank % len(per)]
    return r


def _fake_mode(where: str) -> dict:
    """The optimizer built inside / outside FakeTensorMode (torchtitan's order), stepped inside it after
    a fake forward-backward, on a 2-layer 7B-shaped model on 64 fake FSDP2 ranks."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import fully_shard

    from sharded_msam_sf import AdamWMSAMScheduleFree
    from sharded_msam_sf.testing.comm_count import CommCounter
    from sharded_msam_sf.simulate import models, world
    world.init_fake(3, 64)
    try:
        mesh = world.make_mesh((64,), ("dp",))
        cfg = dict(_cfg("llama-7b"), vocab_size=512)
        mode = FakeTensorMode()
        with mode:
            model = models.build_meta_model(cfg, device="cpu")
            for layer in models.decoder_layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = AdamWMSAMScheduleFree(model.parameters()) if where == "inside" else None
        if opt is None:
            opt = AdamWMSAMScheduleFree(model.parameters())
        with mode:
            opt.train()
            ids = torch.randint(0, 512, (1, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            with CommCounter() as cc:
                opt.step()
        local = sum(p.to_local().numel() for p in model.parameters())
        state = sum(t.to_local().numel() * t.element_size() for st in opt.state.values() for t in st.values())
        return {"local_param_elements": local, "state_bytes": state,
                "collectives": [(c.name, c.bytes, c.group_size) for c in cc.records],
                "k": opt.param_groups[0]["k"]}
    finally:
        world.destroy()


def _meta_refused() -> str:
    import torch

    from sharded_msam_sf import AdamWMSAMScheduleFree
    with torch.device("meta"):
        lin = torch.nn.Linear(4, 4)
    opt = AdamWMSAMScheduleFree(lin.parameters())
    opt.train()
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return "no error"


CALIBRATION = {"fsdp2": (4,), "hsdp": (2, 2), "fsdp2-tp": (2, 2)}
# the fields compared between the simulated rank and the real one
CALIBRATED = ("param_elements", "local_param_elements", "param_bytes", "state_bytes", "state_elements",
              "master_bytes", "state_dtype", "reduction_group_size", "reduction_weighted", "replicas_divided_out",
              "collectives_per_step", "collectives_train_eval", "norm_count", "backend", "coordinate",
              "state_is_12x_local", "shape_rule_matches", "memory")


def real_calibration(rank: int, world_size: int, engine: str) -> dict:
    """On a real gloo rank of 4: the tiny Llama with real weights, wrapped as the simulation wraps it,
    one real forward and backward (FSDP2, HSDP; with TP zero gradients: the plan's activation layouts
    are not what is measured), then the same measurement as the simulation."""
    import torch

    from sharded_msam_sf.simulate import engines, models, world
    from sharded_msam_sf.simulate.measure import measure_optimizer
    from sharded_msam_sf.simulate.mesh_run import _ONE_D
    from sharded_msam_sf.simulate import shape_rule
    out = {}
    for engine, shape in [(engine, CALIBRATION[engine])]:  # one layout per process group (fresh ranks)
        _, names = world.mesh_shape(engine, world_size, shape)
        root = world.make_mesh(shape, names)
        torch.manual_seed(0)
        model = models.build_meta_model(TINY, device="cpu")
        model, kw = engines.wrap(engine, model, root)
        ids = torch.randint(0, TINY["vocab_size"], (2, 8))

        def backward():
            if engine == "fsdp2-tp":
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            else:
                model(input_ids=ids, labels=ids).loss.backward()
        r = measure_optimizer(model, opt_kwargs=kw, backward=backward)
        r["coordinate"] = list(root.get_coordinate())
        r["state_is_12x_local"] = r["state_bytes"] == 12 * r["local_param_elements"]
        if engine in _ONE_D:
            dim = _ONE_D[engine]
            n, i = root[dim].size(), root.get_coordinate()[names.index(dim)]
            r["shape_rule_matches"] = sum(shape_rule.rows_on(p.shape[0], n, i) * (p.numel() // p.shape[0])
                                          for p in model.parameters()) == r["local_param_elements"]
        from sharded_msam_sf.simulate.memory import mesh_estimate
        r["memory"] = mesh_estimate(r)
        out[engine] = {k: r.get(k) for k in CALIBRATED}
    return json.loads(json.dumps(out, default=str))


def mesh_cases() -> dict:
    return {
        "fsdp2_7b_r5": lambda: _mesh("llama-7b", "fsdp2", 1024, 5, all_ranks=True),
        "fsdp2_7b_r1023": lambda: _mesh("llama-7b", "fsdp2", 1024, 1023, all_ranks=True),
        "fsdp2_7b_two_pass": lambda: _mesh("llama-7b", "fsdp2", 1024, 5, sam_mode="two_pass"),
        "fsdp2_70b_r1023": lambda: _mesh("llama-70b", "fsdp2", 1024, 1023),
        "hsdp_8x128": lambda: _mesh("llama-7b", "hsdp", 1024, 700, mesh=(8, 128), all_ranks=True),
        "tp_128x8": lambda: _mesh("llama-7b", "fsdp2-tp", 1024, 13, mesh=(128, 8)),
        "hsdp_tp_4x32x8": lambda: _mesh("llama-70b", "hsdp-tp", 1024, 77, mesh=(4, 32, 8)),
        "pp_tp_2x8": lambda: _mesh("llama-7b", "pp-tp", 16, 9, mesh=(2, 8)),
        "pp_dp_tp_2x4x8": lambda: _mesh("llama-7b", "pp-tp", 64, 9, mesh=(2, 4, 8)),
        "fake_inside": lambda: _fake_mode("inside"),
        "fake_outside": lambda: _fake_mode("outside"),
        "meta_refused": _meta_refused,
        "cli_7b_config_json": _cli_7b,
        "job_fsdp2_tp": _job,
        **{f"calib_{engine}_{r}": (lambda e=engine, s=shape, r=r: _mesh("tiny", e, 4, r, mesh=s))
           for engine, shape in CALIBRATION.items() for r in range(4)},
    }


def _cli_7b() -> dict:
    """The done-criterion: a Llama-2-7B config.json (all 32 layers), FSDP2 on 1,024 ranks, the last rank."""
    import contextlib
    import io
    import tempfile

    from sharded_msam_sf.simulate.cli import main
    from sharded_msam_sf.simulate.models import PRESETS
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "config.json")
        with open(cfg, "w") as f:
            json.dump(dict(PRESETS["llama-7b"], architectures=["LlamaForCausalLM"]), f)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["--model-config", cfg, "--engine", "fsdp2", "--world", "1024", "--rank", "1023",
                       "--all-ranks", "--json", os.path.join(d, "r.json")])
        with open(os.path.join(d, "r.json")) as f:
            report = json.load(f)
    report["all_ranks"].pop("state_bytes_per_rank")
    return {"rc": rc, "stdout": out.getvalue(), "json": report}


def _job() -> dict:
    """The main job's --dry-run --simulate-world 64 on its FSDP2 + TP config."""
    import contextlib
    import io

    from sharded_msam_sf.train import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--config", "configs/job/fsdp2-tp2-cpu.json", "--dry-run", "--simulate-world", "64",
                   "--simulate-rank", "63", "--override", "train.global_batch_size=512",
                   "--override", "train.micro_batch_size=8"])
    return {"rc": rc, "stdout": out.getvalue()}


def zero_cases(stage: int) -> dict:
    return {
        f"zero{stage}_run": lambda: _mesh("tiny", f"zero{stage}", 512, 3, deepspeed_run=True),
        f"zero{stage}_7b": lambda: _mesh("llama-7b", f"zero{stage}", 1024, 1023),
        f"zero{stage}_7b_offload": lambda: _mesh("llama-7b", f"zero{stage}", 1024, 5, offload=True),
    }


def main(group: str) -> None:
    if group == "mesh":
        cases = mesh_cases()
    elif group == "flat":  # a fresh process: a flattened mesh made after other fake worlds finds stale groups
        cases = {"hsdp_tp_4x32x8_flat": lambda: _mesh("llama-70b", "hsdp-tp", 1024, 77, mesh=(4, 32, 8),
                                                      flatten=True)}
    else:  # "zero": every stage in this one process (DeepSpeed is initialised again on each new fake group)
        cases = {k: v for stage in (1, 2, 3) for k, v in zero_cases(stage).items()}
    out = {}
    for name, fn in cases.items():
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 - the test names the case and shows the traceback
            out[name] = {"error": traceback.format_exc()}
    print("SIMULATE-CASES " + json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
