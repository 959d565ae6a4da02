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
import xml.etree.ElementTree as ET

import triton  # noqa: F401  (a test dependency: fail loudly when it is missing)


def test_triton_kernels_under_interpreter(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "triton.xml"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                          f"--junitxml={report}", os.path.join(here, "triton_interpreter_cases.py")], env=env,
                         cwd=os.path.dirname(here), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 3, "failures": 0, "errors": 0, "skipped": 0}, counts
