"""Run under mpiexec: rank discovery through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)),
one ZeRO-2 step with AdamWMSAMScheduleFree, compared with the single-process optimizer."""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests import ds_scenarios as S  # noqa: E402


def main() -> None:
    assert "RANK" not in os.environ, "this script tests MPI discovery: start it with mpiexec, not torchrun"
    torch.set_num_threads(1)
    from sharded_msam_sf.deepspeed import init_distributed
    from sharded_msam_sf.teardown import close_process_group
    init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1", os.environ["MASTER_ADDR"]
    engine, opt = S.make_engine(S.ds_config(2, "fp32", "one_pass"))
    opt.train()
    S.ds_train(engine, opt, 2, "one_pass")
    opt.eval()
    diff = S.max_diff(opt.eval_state_dict(), S.reference_run(2, "one_pass"))
    assert diff <= 1e-5, diff
    print(f"MPI_OK rank={rank} world={world} max_diff={diff:.3g}", flush=True)
    engine.destroy()
    del engine, opt
    close_process_group()


if __name__ == "__main__":
    main()
