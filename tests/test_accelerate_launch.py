"""``accelerate launch --config_file <yaml>`` as users start it: 2 CPU processes, DeepSpeed ZeRO-2 whose JSON the
YAML names with ``deepspeed_config_file`` (on the CPU Accelerate needs that file; an inline ``deepspeed_config``
section is refused there), our optimizer by class + ``attach(model)``, one_pass: x equals the single-process
reference on the same global batches (tests/accelerate_launch_script.py). The script creates the gloo process
group before the ``Accelerator`` (on the CPU Accelerate otherwise runs one process) and shards the batch by
``torch.distributed`` ranks: Accelerate's ``num_processes`` reads 1 there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from tests import ds_scenarios as S  # noqa: E402
from tests.ds_scenarios import shm_op  # noqa: E402,F401
from tests.harness import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shm_op")]
ROOT = Path(__file__).resolve().parents[1]
YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds}
  zero3_init_flag: false
use_cpu: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
rdzv_backend: static
same_network: true
"""


def test_accelerate_launch_config_file_deepspeed_zero2(tmp_path):
    cfg = S.ds_config(2, "fp32", "one_pass")
    cfg.pop("optimizer")
    cfg["zero_allow_untested_optimizer"] = True
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    (tmp_path / "acc.yaml").write_text(YAML.format(ds=tmp_path / "ds.json", port=free_port()))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tmp_path / "acc.yaml"), str(ROOT / "tests/accelerate_launch_script.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rec = json.loads(out.read_text())
    assert rec["distributed"] == "DistributedType.DEEPSPEED" and rec["world"] == rec["engine_dp"] == 2, rec
    assert rec["k"] == [3] * len(rec["k"]), rec
    assert rec["vs_reference"] <= 1e-5, rec
    assert rec["module_is_rounded_x"] == 0.0, rec
    print(f"MAXDIFF accelerate-launch zero2 one_pass {rec['vs_reference']:.2e}")
