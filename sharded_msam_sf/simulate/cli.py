"""The command line of ``python -m sharded_msam_sf.simulate`` (see the package docstring)::

    python -m sharded_msam_sf.simulate --model llama-7b --engine fsdp2 --world 1024 --rank 1023 --all-ranks
    python -m sharded_msam_sf.simulate --model-config path/to/config.json --engine hsdp-tp --world 1024 \\
        --mesh 4x32x8 --rank 77 --json report.json
    python -m sharded_msam_sf.simulate --model llama-70b --engine zero3 --world 1024 --offload
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import ENGINES, simulate
from .models import PRESETS, load_config
from .report import table, write_json
from .world import parse_mesh

__all__ = ["parser", "main"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sharded_msam_sf.simulate",
                                 description="One rank of an N-rank job on torch's fake process group: the "
                                             "optimizer's state bytes, reduction and collectives at scale.")
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", choices=sorted(PRESETS), help="a preset model shape")
    model.add_argument("--model-config", metavar="PATH", help="an HF config.json (any causal LM transformers builds)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--engine", choices=ENGINES, default="fsdp2")
    ap.add_argument("--world", type=int, required=True, metavar="N", help="ranks in the simulated job")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. 8x128 (hsdp), 128x8 (fsdp2-tp), 4x32x8 "
                                                 "(hsdp-tp), 4x8 or 4x4x8 (pp-tp)")
    ap.add_argument("--rank", type=int, default=0, help="the rank simulated (default 0)")
    ap.add_argument("--sam-mode", default="one_pass", choices=("one_pass", "two_pass"))
    ap.add_argument("--all-ranks", action="store_true", help="1-D FSDP2 / HSDP: every rank's state bytes by "
                                                             "the shape rule, fullest and lightest, the 12·P check")
    ap.add_argument("--flatten", action="store_true", help="hsdp-tp: make the (shard, tp) flattened mesh first")
    ap.add_argument("--offload", action="store_true", help="ZeRO: offload_optimizer to the CPU")
    ap.add_argument("--fp32", action="store_true", help="ZeRO: fp32 training (default bf16)")
    ap.add_argument("--deepspeed-run", action="store_true",
                    help="ZeRO: also build DeepSpeed on the fake group and measure (real tensors: small models)")
    ap.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.model, args.model_config, args.layers)
        report = simulate(cfg, args.engine, args.world, args.rank, mesh=parse_mesh(args.mesh),
                          sam_mode=args.sam_mode, all_ranks=args.all_ranks, flatten=args.flatten,
                          offload=args.offload, deepspeed_run=args.deepspeed_run, bf16=not args.fp32)
    except (ValueError, OSError) as err:
        print(f"simulate: error: {err}", file=sys.stderr)
        return 2
    report["model"] = args.model or args.model_config
    table(report, sys.stdout)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
