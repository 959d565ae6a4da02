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
from xml.etree import ElementTree

import triton  # noqa: F401  (a test dependency: fail loudly when it is missing)


def test_triton_kernels_under_interpreter(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "cases.xml"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                          f"--junitxml={report}", os.path.join(here, "triton_interpreter_cases.py")], env=env,
                         cwd=os.path.dirname(here), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    # every case ran (none skipped), read from the child's JUnit report rather than its summary line
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
