"""HTML reports of detoxification runs.

:func:`render_run` turns a run folder (``results.json``, ``samples.jsonl``, ``train_stats.jsonl``;
see ``docs/results-schema.md``) into ``<run-dir>/index.html``; :func:`render_index` lists every run
under a reports folder in ``reports/index.html`` with trend plots. Both pages are single
self-contained files (inline CSS and SVG, no scripts, no network). See ``docs/reports.md``.
"""

from __future__ import annotations

from .render import load_results, render_index, render_run

__all__ = ["render_run", "render_index", "load_results"]
