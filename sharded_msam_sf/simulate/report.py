"""The report: a table on stdout and the JSON file (``--json PATH``).

The JSON is the report dict itself; its keys (the names are a contract, more may be added):
``local_param_elements``, ``state_bytes``, ``master_bytes``, ``reduction_group_size``,
``replicas_divided_out`` (replica count → local elements carrying it), ``collectives_per_step``
(a list of ``{"op", "bytes", "group_size", "shape"}``), ``memory`` (``peak_bytes``,
``adamw_peak_bytes``, …), and, with ``--all-ranks``, ``all_ranks`` (per-rank state bytes, the
fullest and lightest rank, the ``12·P`` sum check and its note).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, TextIO

__all__ = ["table", "write_json", "dumps", "human"]


def human(n: float) -> str:
    """Bytes in binary units (``1.50 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _collectives(calls: List[Dict[str, Any]]) -> str:
    if not calls:
        return "none"
    return "; ".join(f"{c['op']} {c['bytes']} B over {c['group_size']} ranks" for c in calls)


def table(r: Dict[str, Any], out: TextIO) -> None:
    """The human-readable report of one simulated rank."""
    mem = r.get("memory", {})
    rows = [
        ("engine", f"{r.get('engine')} (mesh {'x'.join(map(str, r.get('mesh', [])))} "
                   f"{'x'.join(r.get('mesh_dims', []))})" if r.get("mesh") else r.get("engine")),
        ("rank / world", f"{r.get('rank')} / {r.get('world')}"),
        ("sam_mode", r.get("sam_mode")),
        ("model params P", f"{r.get('param_elements'):,}"),
        ("local param elements", f"{r.get('local_param_elements'):,}"),
        ("optimizer state", f"{r.get('state_bytes'):,} B ({human(r.get('state_bytes', 0))})"
                            f"{'  = 12 x local elements' if r.get('state_is_12x_local') else '  != 12 x local!'}"),
        ("fp32 masters", f"{r.get('master_bytes', 0):,} B"),
        ("reduction group", f"{r.get('reduction_group_size')} ranks"
                            f"{' (weighted)' if r.get('reduction_weighted') else ''}"),
        ("replicas divided out", ", ".join(f"{k}: {v:,} el" for k, v in r.get("replicas_divided_out", {}).items())),
        ("collectives per step", _collectives(r.get("collectives_per_step", []))),
    ]
    if "collectives_train_eval" in r:
        rows.append(("collectives train/eval", _collectives(r["collectives_train_eval"])))
    nc = r.get("norm_count")
    if nc:
        rows.append(("||m|| counts each element", "once" if nc.get("each_element_once") else
                     (f"NOT once ({nc.get('elements_counted')} vs {nc.get('param_elements')})" if nc.get("checked")
                      else f"not checked: {nc.get('reason')}")))
    if "shape_rule_matches" in r:
        rows.append(("DTensor = shape rule", "yes" if r["shape_rule_matches"] else "NO"))
    if "estimate_matches_run" in r:
        same = r["estimate_matches_run"]
        rows.append(("estimate = DeepSpeed run", "yes" if all(same.values()) else
                     "NO: " + ", ".join(k for k, v in same.items() if not v)))
    if mem:
        rows.append(("memory (ours)", f"{human(mem['peak_bytes'])}"
                     + (f" (device {human(mem['device_bytes'])}, host {human(mem['host_bytes'])})"
                        if "device_bytes" in mem else "")))
        rows.append(("memory (AdamW)", f"{human(mem['adamw_peak_bytes'])}  (ours / AdamW = {mem['vs_adamw']:.3f})"))
        rows.append(("memory counts", mem.get("counts", "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    ar = r.get("all_ranks")
    if ar:
        print(f"all {ar['shard_ranks']} shard ranks: fullest rank {ar['fullest_rank']} "
              f"{human(ar['fullest_state_bytes'])} ({ar['fullest_over_even']:.4f} x 12P/N), lightest rank "
              f"{ar['lightest_rank']} {human(ar['lightest_state_bytes'])}; sum {ar['state_bytes_sum']:,} B "
              f"{'==' if ar['sum_is_12P'] else '!='} 12·P = {ar['state_bytes_expected_sum']:,} B", file=out)
        print(f"note: {ar['note']}", file=out)
    dse = r.get("deepspeed_estimate_note")
    if dse:
        print(f"note: {dse}", file=out)


def write_json(r: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        f.write(dumps(r) + "\n")


def dumps(r: Dict[str, Any]) -> str:
    return json.dumps(r, indent=1, sort_keys=True, default=str)
