"""A DeepSpeed smoke run: a tiny regression model trained by AdamWMSAMScheduleFree through
``sharded_msam_sf.deepspeed.initialize`` on synthetic data, to check a launcher and a config.

    SCRIPT=examples/deepspeed_smoke.py launch/deepspeed.sh --config configs/deepspeed/zero2-cpu.json --dist-backend gloo
    SCRIPT=examples/deepspeed_smoke.py launch/mpirun.sh --config configs/deepspeed/zero3-cpu.json --dist-backend gloo
    torchrun --nproc_per_node 2 examples/deepspeed_smoke.py --config configs/deepspeed/zero2-cpu.json --dist-backend gloo

It prints the loss every 5 steps and, at the end, the eval-mode (x) loss; ``--export`` writes
the x weights (fp32), ``--save-dir`` a DeepSpeed checkpoint. The main training job is
``python -m sharded_msam_sf.train`` (what the launch scripts run by default).
"""
import argparse
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from sharded_msam_sf.deepspeed import initialize  # noqa: E402
from sharded_msam_sf.teardown import close_process_group  # noqa: E402


def main(argv: Optional[list] = None) -> int:
    """Train a tiny regression model with the config's optimizer section on synthetic data."""
    parser = argparse.ArgumentParser(prog="examples/deepspeed_smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON config naming AdamWMSAMScheduleFree")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dist-backend", default=None, help="gloo, nccl, mpi, ccl (default: DeepSpeed's choice)")
    parser.add_argument("--save-dir", default=None, help="engine.save_checkpoint here at the end")
    parser.add_argument("--export", default=None, help="write the eval-mode (x) weights here (a directory: model.safetensors + export.json)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, args.width), torch.nn.GELU(), torch.nn.Linear(args.width, 1))
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    engine, optimizer, _, _ = initialize(model=model, config=args.config, dist_backend=args.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(engine.module.parameters()).device
    dtype = next(engine.module.parameters()).dtype
    micro = engine.train_micro_batch_size_per_gpu()
    gen = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))

    def batch():
        x = torch.randn(micro, 16, generator=gen)
        return x.to(device, dtype), (x @ w_true).to(device)

    optimizer.train()
    t0 = time.time()
    for step in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            x, y = batch()
            loss = torch.nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            if optimizer.sam_mode == "two_pass":
                optimizer.move_to_ascent()
                engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
                optimizer.move_from_ascent()
            engine.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    optimizer.eval()
    with torch.no_grad():
        x, y = batch()
        eval_loss = torch.nn.functional.mse_loss(engine(x).float(), y).item()
    if args.export:
        optimizer.save_eval_weights(args.export)
    optimizer.train()
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        print(f"done: world={world} {optimizer!r} eval_loss={eval_loss:.4f} "
              f"({time.time() - t0:.1f} s)", flush=True)
    engine.destroy()
    del engine, optimizer, model
    close_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
