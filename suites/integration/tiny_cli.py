"""Run the ``detox-harness`` CLI in-process and capture what it prints (shared by the integration tests)."""

from __future__ import annotations

import contextlib
import io


def run_cli(args: list[str]) -> tuple[int, str, str]:
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()
