"""Run the ``detox-harness`` CLI in-process and capture what it prints (shared by the integration tests)."""

from __future__ import annotations

import contextlib
import io
import subprocess

import pytest


def run_cli(args: list[str]) -> tuple[int, str, str]:
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a CLI process started by a test; (exit code, stdout, stderr). A process still running after
    ``timeout`` seconds is killed and the test fails with the end of its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout}s:\n{err[-1500:]}")
    return proc.returncode, out, err
