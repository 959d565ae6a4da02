"""The table of docs/scale.md: simulated ranks of full Llama models on up to 1,024 fake ranks.

    PYTHONPATH=. python benchmarks/scale_table.py [--quick]    # markdown on stdout

Each row is one ``sharded_msam_sf.simulate.simulate`` call in this process (the fake group is
rebuilt per row), rank 0 (FSDP2 gives the first ranks the most rows: the fullest rank). ``--quick``:
the 1B rows only.
"""
from __future__ import annotations

import sys

from sharded_msam_sf.simulate import simulate
from sharded_msam_sf.simulate.models import load_config
from sharded_msam_sf.simulate.report import human

ROWS = [
    ("llama-1b", "fsdp2", 64, None, {}),
    ("llama-1b", "zero2", 64, None, {}),
    ("llama-7b", "fsdp2", 1024, None, {}),
    ("llama-7b", "hsdp", 1024, (8, 128), {}),
    ("llama-7b", "fsdp2-tp", 1024, (128, 8), {}),
    ("llama-7b", "zero1", 1024, None, {}),
    ("llama-7b", "zero3", 1024, None, {}),
    ("llama-13b", "fsdp2", 512, None, {}),
    ("llama-70b", "fsdp2", 1024, None, {}),
    ("llama-70b", "hsdp-tp", 1024, (4, 32, 8), {}),
    ("llama-70b", "pp-tp", 1024, (8, 16, 8), {}),
    ("llama-70b", "zero3", 1024, None, {}),
    ("llama-70b", "zero3", 1024, None, {"offload": True}),
]


def main(argv) -> None:
    rows = [r for r in ROWS if r[0] == "llama-1b"] if "--quick" in argv else ROWS
    print("| model | engine | mesh | N | local elements (rank 0) | state / rank | ours: model states | "
          "AdamW | ours / AdamW | optimizer collectives per step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, engine, n, mesh, kw in rows:
        r = simulate(load_config(model), engine, n, 0, mesh=mesh, **kw)
        m = r["memory"]
        calls = "; ".join(f"{c['op']} {c['bytes']} B / {c['group_size']} ranks" for c in r["collectives_per_step"])
        if r.get("collectives_source", "").startswith("estimate"):
            calls += " (est.)"
        name = r["engine"]
        print(f"| {model} | {name} | {'x'.join(map(str, r.get('mesh', [n])))} | {n} | "
              f"{r['local_param_elements']:,} | {human(r['state_bytes'])} | {human(m['peak_bytes'])} | "
              f"{human(m['adamw_peak_bytes'])} | {m['vs_adamw']:.3f} | {calls} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
