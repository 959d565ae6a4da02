"""Every ```bash block of README.md and docs/*.md names things that exist on a fresh clone (issue 24, item 8):
a block whose commands need a GPU, several nodes or Slurm says so on the line above its fence ("Needs ...");
every other block is a CPU block, and in it every repository path exists, every program is one a fresh
clone has (after ``bash scripts/setup_env.sh`` and ``. .venv/bin/activate``), every shipped config named
resolves, and bash parses the block. (Running each CPU block is not done here: ``bash scripts/test.sh`` is the
whole suite and the benchmarks take minutes; the launch lines are run by tests/test_train_run.py,
tests/test_deepspeed_launch.py and tests/test_wheel.py.)"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"bash", "python", "python3", "torchrun", "deepspeed", "mpiexec", "mpirun", "msam-train", "msam-export",
            "msam-checkpoint", "msam-simulate", "pip", ".", "cd", "export", "ls", "cat", "tensorboard", "wandb",
            "mlflow", "kill", "sleep", "rm", "mkdir"}
REPO_DIRS = ("scripts/", "launch/", "configs/", "examples/", "benchmarks/", "docs/", "tests/", "sharded_msam_sf/")
NEEDS = re.compile(r"\bneeds?\b.*\b(GPU|GPUs|CUDA|nodes?|Slurm|sbatch|srun)\b", re.IGNORECASE)


def blocks():
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```bash":
                above = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                out.append(pytest.param(doc.relative_to(ROOT), i + 1, above, "\n".join(lines[i + 1:j]),
                                        id=f"{doc.relative_to(ROOT)}:{i + 1}"))
                i = j
            i += 1
    return out


def _commands(text: str):
    """The block's commands: comments dropped, continuation lines joined, env assignments skipped."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words.pop(0)
        if words:
            yield words


@pytest.mark.parametrize("doc,line,above,text", blocks())
def test_shell_block_runs_on_a_fresh_clone_or_says_what_it_needs(doc, line, above, text):
    if NEEDS.search(above):
        return  # the line above says what it needs (a GPU, several nodes, Slurm)
    assert subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0, text
    from sharded_msam_sf.shipped_configs import resolve
    for words in _commands(text):
        prog = words[0]
        assert prog in PROGRAMS or (ROOT / prog).is_file(), (
            f"{doc}:{line}: '{prog}' is neither a program a fresh clone has nor a repository file; if the block "
            f"needs a GPU or several nodes, say so on the line above the fence ('Needs ...')")
        for w in words:
            for token in re.split(r"[=,]", w):
                if token.startswith(REPO_DIRS) and not any(ch in token for ch in "*{$<"):
                    assert (ROOT / token).exists(), f"{doc}:{line}: {token} does not exist"
        if "--config" in words:
            name = words[words.index("--config") + 1]
            if not name.startswith(("$", "<")) and name != "...":
                resolve(name if not name.startswith(REPO_DIRS) else ROOT / name)
