"""The main job: train a GPT with AdamWMSAMScheduleFree from one JSON config.

``msam-train`` (= ``python -m sharded_msam_sf.train``). ``--config`` takes a shipped config's
name (``--list-configs``) or a file; without it the job runs the shipped ``default``
(DeepSpeed ZeRO-2, 2 CPU ranks, gloo, one_pass, a byte-level GPT on the Python standard
library's source, 150 steps; it ends below the unigram baseline).

Two CPU ranks on this machine, with any of the stock launchers::

    torchrun --standalone --nproc-per-node 2 -m sharded_msam_sf.train --config default
    deepspeed --num_gpus 2 --module sharded_msam_sf.train --config default
    mpiexec -n 2 msam-train --config default
    srun -n 2 msam-train --config default                      # inside a Slurm allocation

FSDP2 + tensor parallel (dp 2 x tp 2) and + pipeline parallel (pp 2 x dp 2) on four CPU ranks::

    torchrun --standalone --nproc-per-node 4 -m sharded_msam_sf.train --config fsdp2-tp2-cpu
    torchrun --standalone --nproc-per-node 4 -m sharded_msam_sf.train --config fsdp2-pp2-cpu

One node with 8 GPUs, your token files (nanoGPT's train.bin/val.bin)::

    torchrun --standalone --nproc-per-node 8 -m sharded_msam_sf.train --config gpt-1.3b-gpu --data DATA_DIR

Two nodes with 8 GPUs each (the same line on both)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500 \\
        -m sharded_msam_sf.train --config gpt-1.3b-gpu --data DATA_DIR

Options: ``--override section.key=value`` (repeatable; the value is JSON or a string),
``--data PATH`` (a uint16/uint32 token file, or a directory with train.bin/val.bin),
``--resume [PATH]`` (require a checkpoint; by default a run resumes if its out_dir has
one), ``--dry-run`` (validate, build, print, exit), ``--print-config`` (the resolved config
after overrides), ``--print-schema`` (the config's JSON Schema), ``--list-configs``. Only rank 0
logs and writes files other than sharded checkpoints. Exit status: 0 done, 1 a checkpoint or
run-directory error (a checkpoint that fails verification, another job on the out_dir, a full
disk, ...), 2 bad config or a missing dependency (before any process group starts, printed by
rank 0 only), 3 stopped after train.max_skipped_steps consecutive non-finite steps, 128+N after
a checkpoint taken on signal N (SIGTERM/SIGINT).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings

if __name__ == "__main__" and not __package__:  # `python path/to/sharded_msam_sf/train.py`: run as the module
    import runpy
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not the package dir itself
    runpy.run_module("sharded_msam_sf.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

from .job.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = "default"  # the shipped configs/job/default.json (sharded_msam_sf.shipped_configs)
_NOISE = (  # deprecation chatter from torch internals that users cannot act on
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`_get_pg_default_device` will be deprecated",
    r"Multiple backends are registered with this ProcessGroup",
    r"`torch.distributed.reduce_op` is deprecated",  # torch.distributed.pipelining's isinstance checks
)


def default_config_path() -> str:
    """The shipped configs/job/default.json (inside the package; the repository's configs/ links to it)."""
    from .shipped_configs import resolve
    return str(resolve(DEFAULT_CONFIG))


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="msam-train", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="NAME_OR_FILE",
                   help=f"a shipped config's name (see --list-configs) or a JSON file (default: {DEFAULT_CONFIG})")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key, e.g. train.max_steps=50 (repeatable)")
    p.add_argument("--data", help="token file (uint16/uint32 memmap) or directory with train.bin/val.bin")
    p.add_argument("--resume", nargs="?", const="must", metavar="PATH",
                   help="resume from the latest checkpoint in out_dir (error if none) or from PATH")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build everything, exit")
    p.add_argument("--print-config", action="store_true",
                   help="write the resolved config (file, overrides and defaults) as JSON to stdout and exit")
    p.add_argument("--print-schema", action="store_true", help="write the config's JSON Schema to stdout and exit")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    p.add_argument("--simulate-world", type=int, default=None, metavar="N",
                   help="with --dry-run: one rank of an N-rank run of this config on a fake process group "
                        "(state bytes, the optimizer's collectives, memory vs AdamW; sharded_msam_sf.simulate)")
    p.add_argument("--simulate-rank", type=int, default=0, metavar="R", help="the rank --simulate-world reports")
    # the stock deepspeed launcher (and torch.distributed.launch) pass --local_rank=N
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _launch_rank() -> int:
    """This process's rank from the launcher's environment (0 when none says, or when it cannot be read)."""
    from .launch_env import discover
    try:
        return discover().rank
    except ValueError:
        return 0


def _fail(message: str, code: int = 2) -> int:
    """Print a refusal once (rank 0; every rank returns the same code)."""
    if _launch_rank() == 0:
        print(message, file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:  # the deepspeed launcher sets LOCAL_RANK too; keep an explicit one
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.print_schema:
        from .job.config import json_schema
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.list_configs:
        from .shipped_configs import list_text
        print(list_text())
        return 0
    overrides = list(args.override) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:  # every config error surfaces here, before any process group starts
        from .shipped_configs import resolve
        cfg = load_config(resolve(args.config or DEFAULT_CONFIG, error=ConfigError), overrides, data_path=args.data,
                          world_size=args.simulate_world)
        if args.simulate_world is not None:  # a report, in this process: no rank, no run directory
            if not args.dry_run:
                raise ConfigError("--simulate-world needs --dry-run")
            from .job.simulate import simulate_job
            return simulate_job(cfg, args.simulate_world, args.simulate_rank)
    except (ConfigError, ValueError) as e:
        return _fail(f"config error: {e}")
    if args.print_config:
        if _launch_rank() == 0:
            print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .job import preflight
    problems = preflight.check(cfg)  # libraries, the device, a stale build lock: before any process group
    if problems:
        return _fail("\n".join(f"config error: {p}" for p in problems))
    hint = preflight.thread_hint(cfg, _local_world())
    if hint and _launch_rank() == 0:
        print(hint, file=sys.stderr)

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # "2 sequential all_gather operations will be performed" when the export gathers a dp x tp sharded weight
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    from .job.checkpoint import CheckpointError, Checkpointer, RunDirError, check_out_dir
    try:  # refusals that need no process group: an out_dir others can write to, a pointer out of it
        check_out_dir(cfg.log.out_dir)
        if cfg.checkpoint.resume == "must" and Checkpointer(cfg.log.out_dir, 0, 1).latest() is None:
            return _fail(f"config error: --resume: no complete checkpoint under {cfg.log.out_dir}/checkpoints")
    except (RunDirError, CheckpointError) as e:
        return _fail(f"error: {e}")
    import torch.distributed as dist

    from .job.data import load_corpus
    from .job.engines import LaunchMismatch, build_engine, init_distributed
    from .job.trainer import Diverged, Interrupted, run
    from .teardown import close_process_group

    try:
        corpus = load_corpus(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
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


def _local_world():
    from .launch_env import discover
    try:
        return discover().local_world_size
    except ValueError:
        return None


def cli() -> None:
    """The ``msam-train`` console command."""
    from .teardown import exit_process
    exit_process(main())


if __name__ == "__main__":
    cli()
