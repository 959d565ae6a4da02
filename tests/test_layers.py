"""The package's layers (DESIGN.md, issue 10): a module imports only from its own layer or below,
and the import graph has no cycle. Imports under ``if TYPE_CHECKING:`` are annotations only and
are not counted. A new module must be placed in LAYERS (the test names any that is not)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sharded_msam_sf"

# bottom-up; the first matching prefix wins (longest prefixes first where they overlap)
LAYERS = [
    (0, ("kernels", "hyperparams", "teardown", "launch_env", "comm_count")),          # the math, the rules, the process
    (1, ("reference", "backends", "backends.pipeline", "config", "jsonfile", "local_ranks", "weights_io",
         "decay_groups", "backends.zero_universal")),                                   # oracle, engines, schemas
    (2, ("optimizer",)),                                                                # the optimizer
    (3, ("deepspeed", "deepspeed_config", "analysis")),                                # engine glue, analysis
    (4, ("integrations",)),                                                             # HF, Lightning
    (4, ("simulate",)),                                     # one rank of N on a fake process group (issue 22)
    (5, ("job", "train")),                                                              # the main job
    (6, ("export", "checkpoint")),                        # offline tools that read the job's checkpoints
    (7, ("",)),                                                                         # the package root
]


def _name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _layer(name: str) -> int:
    best = None
    for layer, prefixes in LAYERS:
        for pre in prefixes:
            if name == pre or name.startswith(pre + ".") or (pre == "" and name == ""):
                if best is None or len(pre) > best[1]:
                    best = (layer, len(pre))
    if best is None:
        raise AssertionError(f"module sharded_msam_sf.{name} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join([*base, *([child.module] if child.module else [])])
                elif (child.module or "").startswith("sharded_msam_sf"):
                    target = child.module[len("sharded_msam_sf"):].lstrip(".")
                else:
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if sub in modules else target)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("sharded_msam_sf"):
                        found.add(alias.name[len("sharded_msam_sf"):].lstrip("."))
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return {m for m in found if m in modules}


FILES = sorted(PKG.rglob("*.py"))
MODULES = {_name(p) for p in FILES}
GRAPH = {_name(p): _imports(p, MODULES) for p in FILES}


@pytest.mark.parametrize("module", sorted(GRAPH), ids=lambda m: m or "sharded_msam_sf")
def test_imports_only_its_layer_or_below(module):
    mine = _layer(module)
    above = sorted(dep for dep in GRAPH[module] if _layer(dep) > mine)
    assert not above, f"sharded_msam_sf.{module} (layer {mine}) imports from a layer above: {above}"


def test_no_import_cycle():
    # a package's __init__ re-exporting its submodules is not a cycle with them
    def deps(m):
        return {d for d in GRAPH[m] if not (m and d.startswith(m + ".") and m in GRAPH)}

    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(c or "sharded_msam_sf" for c in cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            dfs(m)
