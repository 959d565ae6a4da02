"""The package's layers (DESIGN.md, issues 10 and 21): a module imports only from its own layer or below,
and the import graph has no cycle. Every import counts, also those under ``if TYPE_CHECKING:`` and
inside functions (an annotation-only import from a layer above is still a link upwards). On top of
the layers, named links are forbidden (FORBIDDEN): the back ends never import the optimizer or the
DeepSpeed wing, the optimizer never imports the DeepSpeed wing, and only the job itself, the entry
point train.py and the offline tools import the job; and no module runs one of the package's own
command lines (``python -m sharded_msam_sf.…``) by subprocess where the function behind it can be
called. A new module must be placed in LAYERS (the test names any that is not)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sharded_msam_sf"

# bottom-up; the first matching prefix wins (longest prefixes first where they overlap)
LAYERS = [
    (0, ("kernels", "hyperparams", "teardown", "launch_env", "extension_lock")),                          # the math, the rules, the process
    (1, ("reference", "backends", "config", "jsonfile", "weights_io", "output_dir", "save_guards", "testing", "shipped_configs")),    # oracle, engines' views, schemas
    (2, ("optimizer",)),                                                                # the optimizer
    (3, ("deepspeed", "deepspeed_config", "analysis", "accumulation", "bn", "portable")),  # DeepSpeed wing, analysis, loops, BN, portable state
    (4, ("integrations",)),                                                             # HF, Lightning
    (4, ("simulate",)),                                     # one rank of N on a fake process group (issue 22)
    (5, ("job", "train", "export", "checkpoint", "convert", "checkpoint_seal", "safe_load")),    # the main job and the offline tools that read its checkpoints
    (6, ("",)),                                                                         # the package root
]

# (importer prefix, imported prefix, allowed importers): links forbidden whatever the layers say
FORBIDDEN = [
    ("backends", "optimizer", ()),
    ("backends", "deepspeed", ()),
    ("optimizer", "deepspeed", ()),
    ("", "job", ("job", "train", "export", "checkpoint", "checkpoint_seal")),
]


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


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


def _imports(path: Path, modules: set[str], text: str | None = None) -> set[str]:
    """The package's modules that ``path`` (or ``text`` standing for it) imports."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
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

    visit(ast.parse(path.read_text() if text is None else text))
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


@pytest.mark.parametrize("module", sorted(GRAPH), ids=lambda m: m or "sharded_msam_sf")
def test_no_forbidden_link(module):
    bad = sorted(dep for dep in GRAPH[module] for src, dst, allowed in FORBIDDEN
                 if _under(module, src) and _under(dep, dst) and not _under(module, dst)
                 and not any(_under(module, a) for a in allowed))
    assert not bad, f"sharded_msam_sf.{module} imports {bad}: a forbidden link (FORBIDDEN in {__file__})"


def _cli_runs(path: Path) -> list:
    """``[..., "-m", "sharded_msam_sf.x", ...]`` literals: the package's own command lines, run as a process."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple)):
            strings = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if "-m" in strings and any(v.startswith("sharded_msam_sf") for v in strings):
                out.append(f"line {node.lineno}: {[v for v in strings if v.startswith('sharded_msam_sf')][0]}")
    return out


@pytest.mark.parametrize("path", [p for p in FILES if not _under(_name(p), "testing")],
                         ids=lambda p: _name(p) or "sharded_msam_sf")
def test_no_own_cli_by_subprocess(path):
    runs = _cli_runs(path)
    assert not runs, (f"sharded_msam_sf.{_name(path)} runs the package's own command line as a process ({runs}): "
                      "call the function behind it")


def test_the_rules_see_what_they_forbid(tmp_path):
    """The checks above fail where they should: an import under TYPE_CHECKING or in a function is
    counted, and a subprocess command line of the package is found."""
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..optimizer import X\n"
            "def f():\n    from ..deepspeed import attach\n"
            "cmd = [sys.executable, '-m', 'sharded_msam_sf.checkpoint', 'to-universal']\n")
    assert _imports(PKG / "backends" / "probe.py", MODULES, text) == {"optimizer", "deepspeed"}
    f = tmp_path / "probe.py"
    f.write_text(text)
    assert _cli_runs(f)


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
