"""The script that ``accelerate launch --config_file <yaml>`` runs in tests/test_accelerate_launch.py: our
optimizer by class through ``accelerator.prepare`` (DeepSpeed ZeRO-2 from the YAML's ``deepspeed_config_file``),
``attach(model)``, the one_pass loop on this rank's share of each global batch, ``eval()``, and rank 0 writes
x (the engine's masters in eval mode) and the step counters to ``sys.argv[1]``."""
import json
import sys

import torch
from accelerate import Accelerator

from sharded_msam_sf import AdamWMSAMScheduleFree
from sharded_msam_sf.deepspeed import attach, facade_of
from tests import ds_scenarios as S

STEPS = 3


def main(out: str) -> None:
    import torch.distributed as dist
    if not dist.is_initialized():  # on the CPU Accelerate runs DeepSpeed on a process group only if one exists
        dist.init_process_group("gloo")
    acc = Accelerator()
    model = S.make_model()
    cfg = S.ds_config(2, "fp32", "one_pass")["optimizer"]["params"]
    opt = AdamWMSAMScheduleFree(S.param_groups(model, cfg["lr"]), lr=cfg["lr"], rho=cfg["rho"],
                                betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                                warmup_steps=cfg["warmup_steps"])
    model, opt = acc.prepare(model, opt)
    attach(model)
    # Accelerate's own process_index / num_processes read 0 / 1 on the CPU under DeepSpeed (measured,
    # accelerate 1.15): shard by the process group, which the engine uses
    rank, world = dist.get_rank(), dist.get_world_size()
    per = S.GLOBAL_BATCH // world
    opt.train()
    for k in range(STEPS):
        x, y = S.batch(k)
        acc.backward(S.loss_fn(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]))
        opt.step()
        opt.zero_grad()
    opt.eval()
    facade = facade_of(opt)
    diff = S.max_diff(facade.eval_state_dict(), S.reference_run(STEPS, "one_pass"))
    rec = dict(distributed=str(acc.distributed_type), world=world, engine_dp=model.dp_world_size,
               accelerate_num_processes=acc.num_processes, k=[g["k"] for g in facade.param_groups],
               vs_reference=diff, module_is_rounded_x=S.rounded_equal(model))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rec, f)
    acc.wait_for_everyone()
    model.destroy()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
