"""The hand-written Triton kernels (CUDA's fp32-state path), run on the CPU under
``TRITON_INTERPRET=1``: the same trajectory as foreach and the reference.

Triton reads ``TRITON_INTERPRET`` when it is imported, so the kernel cases live in
``tests/triton_interpreter_cases.py`` (not collected on its own) and run in a child
pytest process started with it. Triton is a test dependency (``.[test]``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import triton  # noqa: F401  (a test dependency: fail loudly when it is missing)


def test_triton_kernels_under_interpreter():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                          os.path.join(here, "triton_interpreter_cases.py")], env=env, cwd=os.path.dirname(here),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout, out.stdout[-2000:]
