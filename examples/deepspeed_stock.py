"""AdamWMSAMScheduleFree through the stock DeepSpeed API: ``deepspeed.initialize(args=...)`` with
``--deepspeed_config FILE``, after ``sharded_msam_sf.deepspeed.register()``.

    deepspeed --num_gpus 2 examples/deepspeed_stock.py --deepspeed_config configs/deepspeed/zero2-cpu.json
    torchrun --nproc-per-node 2 examples/deepspeed_stock.py --deepspeed_config configs/deepspeed/zero3-cpu.json

The config's ``"optimizer": {"type": "AdamWMSAMScheduleFree", "params": {...}}`` builds our optimizer;
the loop is DeepSpeed's own. It trains a small regression model on synthetic data, prints the
train-mode loss and, at the end, the eval-mode (x) loss, and exits 1 unless x beats the start.
On a CPU (no CUDA) it uses gloo; ``DS_ACCELERATOR=cpu`` is set for you there.
"""
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

import sharded_msam_sf.deepspeed as msam_deepspeed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--steps", type=int, default=100)
    parser = deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    args = parser.parse_args()

    msam_deepspeed.register()  # DeepSpeed now builds AdamWMSAMScheduleFree from the JSON's optimizer section
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())

    rank = torch.distributed.get_rank()
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    gen = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))
    x_val = torch.randn(256, 16, generator=torch.Generator().manual_seed(99))

    def val_loss() -> float:
        with torch.no_grad():
            pred = engine(x_val.to(device, dtype)).float()
        return torch.nn.functional.mse_loss(pred, (x_val @ w_true).to(device)).item()

    optimizer.eval()  # the ZeRO wrapper answers our API once register() has attached it
    start = val_loss()
    optimizer.train()
    for step in range(1, args.steps + 1):
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randn(engine.train_micro_batch_size_per_gpu(), 16, generator=gen)
            loss = torch.nn.functional.mse_loss(engine(x.to(device, dtype)).float(), (x @ w_true).to(device))
            engine.backward(loss)
            engine.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: train loss {loss.item():.4f} (at the gradient point)", flush=True)
    optimizer.eval()  # the params now hold x, the schedule-free average
    end = val_loss()
    if rank == 0:
        print(f"eval-mode (x) loss: {end:.4f} (start {start:.4f})", flush=True)
    engine.destroy()
    torch.distributed.destroy_process_group()
    return 0 if end < start else 1


if __name__ == "__main__":
    raise SystemExit(main())
