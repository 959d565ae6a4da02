"""The main job: train a GPT with AdamWMSAMScheduleFree from one JSON config.

One node, two CPU ranks, the embedded default (DeepSpeed ZeRO-2, gloo, a byte-level
model on the Python standard library's source)::

    launch/torchrun.sh                      # = the line below
    torchrun --standalone --nproc-per-node 2 -m sharded_msam_sf.train --config configs/job/default.json

FSDP2 + tensor parallel, dp 2 x tp 2 on four CPU ranks (parallel.tp = 2)::

    NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-tp2-cpu.json

FSDP2 + pipeline parallel, pp 2 x dp 2 on four CPU ranks (parallel.pp = 2, model.tie_embeddings = false)::

    NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-pp2-cpu.json

One GPU / one process (the global batch is kept; accumulation makes up the ranks)::

    python -m sharded_msam_sf.train --config configs/job/gpt-1.3b-gpu.json --data /data/owt

One node with 8 GPUs::

    torchrun --standalone --nproc-per-node 8 -m sharded_msam_sf.train --config configs/job/gpt-1.3b-gpu.json --data /data/owt

Two nodes with 8 GPUs each (run on both; node-rank 0 and 1)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:29500 -m sharded_msam_sf.train --config configs/job/gpt-1.3b-gpu.json

Also started by launch/deepspeed.sh, launch/mpirun.sh and launch/slurm.sbatch. Options:
``--override section.key=value`` (repeatable; the value is JSON or a string),
``--data PATH`` (a uint16/uint32 token file, or a directory with train.bin/val.bin),
``--resume [PATH]`` (require a checkpoint; by default a run resumes if its out_dir has
one), ``--dry-run`` (validate, build, print, exit), ``--print-schema`` (the config's JSON
Schema, as docs/job-config.schema.json). Only rank 0 logs and writes files
other than sharded checkpoints. Exit status: 0 done, 1 a checkpoint or run-directory error (a
checkpoint that fails verification, another job on the out_dir, a full disk, ...), 2 bad config
(before any process group starts), 3 stopped after train.max_skipped_steps consecutive non-finite
steps, 128+N after a checkpoint taken on signal N (SIGTERM/SIGINT).
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
import warnings
from pathlib import Path

from .job.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/job/default.json"
_NOISE = (  # deprecation chatter from torch internals that users cannot act on
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`_get_pg_default_device` will be deprecated",
    r"Multiple backends are registered with this ProcessGroup",
    r"`torch.distributed.reduce_op` is deprecated",  # torch.distributed.pipelining's isinstance checks
)


def default_config_path() -> str:
    """configs/job/default.json in the working directory, else the one next to the package (a clone)."""
    here = Path(DEFAULT_CONFIG)
    if here.is_file():
        return str(here)
    beside = Path(__file__).resolve().parents[1] / DEFAULT_CONFIG
    return str(beside if beside.is_file() else here)


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m sharded_msam_sf.train", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"job config JSON (default: {DEFAULT_CONFIG})")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key, e.g. train.max_steps=50 (repeatable)")
    p.add_argument("--data", help="token file (uint16/uint32 memmap) or directory with train.bin/val.bin")
    p.add_argument("--resume", nargs="?", const="must", metavar="PATH",
                   help="resume from the latest checkpoint in out_dir (error if none) or from PATH")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build everything, exit")
    p.add_argument("--simulate-world", type=int, default=None, metavar="N",
                   help="with --dry-run: one rank of an N-rank run of this config on a fake process group "
                        "(state bytes, the optimizer's collectives, memory vs AdamW; sharded_msam_sf.simulate)")
    p.add_argument("--simulate-rank", type=int, default=0, metavar="R", help="the rank --simulate-world reports")
    p.add_argument("--print-schema", action="store_true",
                   help="write the config's JSON Schema to stdout and exit (docs/job-config.schema.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_schema:
        import json

        from .job.config import json_schema
        print(json.dumps(json_schema(), indent=2))
        return 0
    overrides = list(args.override) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:  # every config error surfaces here, before any process group starts
        cfg = load_config(args.config or default_config_path(), overrides, data_path=args.data,
                          world_size=args.simulate_world)
        if args.simulate_world is not None:  # a report, in this process: no rank, no run directory
            if not args.dry_run:
                raise ConfigError("--simulate-world needs --dry-run")
            from .job.simulate import simulate_job
            return simulate_job(cfg, args.simulate_world, args.simulate_rank)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # "2 sequential all_gather operations will be performed" when the export gathers a dp x tp sharded weight
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    from .job.checkpoint import CheckpointError, Checkpointer, RunDirError, check_out_dir
    try:  # refusals that need no process group: an out_dir others can write to, a pointer out of it
        check_out_dir(cfg.log.out_dir)
        if cfg.checkpoint.resume == "must" and Checkpointer(cfg.log.out_dir, 0, 1).latest() is None:
            print(f"config error: --resume: no complete checkpoint under {cfg.log.out_dir}/checkpoints",
                  file=sys.stderr)
            return 2
    except (RunDirError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from .job.data import load_corpus
    from .job.engines import LaunchMismatch, build_engine, init_distributed
    from .job.trainer import Diverged, Interrupted, run
    from .teardown import close_process_group

    try:
        corpus = load_corpus(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    engine, env = None, None
    try:
        env = init_distributed(cfg)
        engine = build_engine(cfg, env)
        run(cfg, env, engine, corpus, dry_run=args.dry_run)
        # every rank finishes its work (rank 0 writes the plot and summary) before any rank tears
        # its process group down
        dist.barrier()
        return 0
    except Interrupted as e:
        if env.rank == 0:
            print(str(e), file=sys.stderr)
        return 128 + e.signum
    except (CheckpointError, RunDirError, Diverged) as e:
        if env is None or env.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, Diverged) else 1
    except LaunchMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: no space left on device: {e.filename or e}", file=sys.stderr)
            return 1
        raise
    finally:
        if engine is not None:
            engine.close()
        engine = None  # the engine holds the process group: drop it before the collection below
        close_process_group()


if __name__ == "__main__":
    from .teardown import exit_process
    exit_process(main())
