"""Render a run folder (``results.json`` + ``samples.jsonl`` + ``train_stats.jsonl``) into one HTML page.

The page is self-contained: CSS is inline, the plots are inline SVG, and there is no JavaScript,
no web font and no URL to fetch. Every string that comes from a run (model outputs, prompts,
config values, run ids) goes through Jinja2's autoescaping; the only markup that is inserted
unescaped is the SVG this package draws itself (:mod:`harness.report.plots`).

File formats: ``docs/results-schema.md``. Usage: ``docs/reports.md``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import jinja2

from ..errors import HarnessError
from ..results import (
    RESULTS_FILE,
    SAMPLES_FILE,
    TRAIN_STATS_FILE,
    atomic_write_text,
    load_results,
    read_jsonl,
    run_file,
)
from . import plots

PAGE = "index.html"

#: rows shown above the fold at each end of the qualitative table
QUALITATIVE_VISIBLE = 5
#: when ``qualitative`` is missing, at most this many rows are derived from samples.jsonl (half best, half worst)
QUALITATIVE_FALLBACK_ROWS = 40

NOT_MEASURED = "not measured"


# --------------------------------------------------------------------------------------------
# reading: the run files' names, schema and readers live in harness.results

def _err(path: Path, message: str, fix: str | None = None) -> HarnessError:
    return HarnessError(message, field=str(path), fix=fix)


# --------------------------------------------------------------------------------------------
# formatting (Jinja filters)

def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for a table cell: ``None`` -> "not measured", NaN -> "NaN", otherwise ``digits`` significant."""
    if v is None:
        return NOT_MEASURED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == 0:
            return "0"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_signed(v: Any, digits: int = 4) -> str:
    text = fmt_num(v, digits)
    if _number(v) and math.isfinite(v) and v > 0:
        return "+" + text
    return text


def fmt_pct(v: Any, digits: int = 1) -> str:
    if not _number(v):
        return fmt_num(v)
    if not math.isfinite(v):
        return fmt_num(float(v))
    return f"{100 * v:.{digits}f}%"


def fmt_duration(v: Any) -> str:
    if not _number(v) or not math.isfinite(v):
        return fmt_num(v)
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(int(round(v)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(v: Any) -> str:
    """A config value: strings as they are, everything else as JSON."""
    if isinstance(v, str):
        return v
    if v is None:
        return "null"
    return json.dumps(v, ensure_ascii=False)


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt_num, signed=fmt_signed, pct=fmt_pct, duration=fmt_duration, value=fmt_value)
    env.tests.update(missing=is_missing)
    return env


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = _env()
    return _ENV


# --------------------------------------------------------------------------------------------
# page contents

class Lenient(dict):
    """A dict whose missing keys read as ``None`` in templates ("not measured"), never as an error."""

    def __missing__(self, key):
        return None


def _lenient(d: Any) -> Lenient:
    return Lenient(d) if isinstance(d, dict) else Lenient()


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def flatten_config(config: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """``{"ppo": {"steps": 40}}`` -> ``[("ppo.steps", 40)]``, in the config's own order."""
    out: list[tuple[str, Any]] = []
    if config:
        _flatten("", config, out)
    return out


def verdict_context(results: dict[str, Any]) -> dict[str, Any]:
    """The verdict rows and the overall result: ``overall`` is "PASS", "FAIL" or "NOT JUDGED"."""
    verdict = results.get("verdict")
    if not verdict:
        return {"judged": False, "overall": "NOT JUDGED", "bounds": [], "held": 0}
    bounds = []
    for b in verdict.get("bounds", []):
        value = b.get("value")
        bounds.append({
            "name": str(b.get("name", "?")),
            "op": str(b.get("op", "")),
            "bound": b.get("bound"),
            "value": None if is_missing(value) else value,
            "passed": bool(b.get("passed")),
            "description": str(b.get("description") or ""),
        })
    passed = verdict.get("passed")
    if not isinstance(passed, bool):
        passed = all(b["passed"] for b in bounds)
    baseline = results.get("baseline")
    if isinstance(baseline, dict) and baseline.get("passed") is False:
        passed = False  # the run exits 1 when a metric left its baseline: the headline says so too
    return {"judged": True, "overall": "PASS" if passed else "FAIL", "bounds": bounds,
            "held": sum(b["passed"] for b in bounds)}


TOXICITY_ROWS = [  # (key, label, format)
    ("toxicity_mean", "mean toxicity", "num"),
    ("toxicity_std", "std of toxicity", "num"),
    ("toxic_rate", "toxic rate (share above the threshold)", "pct"),
    ("expected_max_toxicity", "expected maximum toxicity", "num"),
    ("toxicity_probability", "toxicity probability (≥ 1 toxic of k)", "pct"),
    ("reward_mean", "mean reward", "num"),
    ("reward_std", "std of reward", "num"),
]

QUALITY_ROWS = [  # (key, label, format, bound that guards it)
    ("rouge1", "ROUGE-1", "num", None),
    ("rouge2", "ROUGE-2", "num", None),
    ("rougeL", "ROUGE-L", "num", "max_rouge_l_drop"),
    ("empty_rate", "empty summaries", "pct", "max_empty_rate"),
    ("length_mean", "mean length, tokens", "num", None),
    ("distinct_1", "distinct-1", "num", None),
    ("distinct_2", "distinct-2", "num", None),
    ("repeated_ngram_rate", "repeated n-gram rate", "pct", None),
    ("kl_per_token_mean", "KL per token, nats", "num", None),
    ("kl_per_sequence_mean", "KL per sequence, nats", "num", "max_kl"),
    ("second_toxicity_mean", "second-classifier toxicity", "num", None),
    ("response_toxicity_mean", "toxicity of the summary alone", "num", None),
    ("degenerate_rate", "degenerate summaries", "pct", "max_degenerate_rate"),
    ("copy_rate", "summaries copying the dialogue", "pct", "max_copy_rate_increase"),
]


#: bounds shown under the improvement figures; those not in percent are in nats
IMPROVEMENT_BOUNDS = ("min_improvement", "min_improvement_ci_low", "min_response_improvement_ci_low",
                      "min_second_improvement_ci_low", "max_judge_gap", "min_reward_gain", "min_logp_clean_gain")
NATS_BOUNDS = ("min_reward_gain", "min_logp_clean_gain")


def _metric_rows(before: dict, after: dict, spec: Iterable[tuple], bounds: dict[str, dict]) -> list[dict]:
    rows = []
    for key, label, form, *rest in spec:
        b, a = before.get(key), after.get(key)
        b = None if is_missing(b) else b
        a = None if is_missing(a) else a
        change = a - b if _number(a) and _number(b) else None
        guard = bounds.get(rest[0]) if rest and rest[0] else None
        rows.append({"key": key, "label": label, "format": form, "before": b, "after": a, "change": change,
                     "guard": guard})
    return rows


def _reward_diff(row: dict[str, Any]) -> float | None:
    d = row.get("reward_diff")
    if _number(d) and not math.isnan(d):
        return float(d)
    b, a = row.get("reward_before"), row.get("reward_after")
    if _number(a) and _number(b) and not (math.isnan(a) or math.isnan(b)):
        return float(a) - float(b)
    return None


def qualitative_rows(results: dict[str, Any], samples: list[dict[str, Any]]) -> tuple[list[dict], str]:
    """Rows sorted by reward difference, best first (missing differences last), and where they came from."""
    source = "results.json"
    raw = results.get("qualitative")
    if not raw:
        raw = samples
        source = SAMPLES_FILE
    rows = []
    for r in raw:
        rows.append({
            "query": str(r.get("query") or ""),
            "response_before": str(r.get("response_before") or ""),
            "response_after": str(r.get("response_after") or ""),
            "reward_before": r.get("reward_before"),
            "reward_after": r.get("reward_after"),
            "toxicity_before": r.get("toxicity_before"),
            "toxicity_after": r.get("toxicity_after"),
            "reward_diff": _reward_diff(r),
        })
    rows.sort(key=lambda r: (r["reward_diff"] is None, -(r["reward_diff"] or 0.0)))
    if source == SAMPLES_FILE and len(rows) > QUALITATIVE_FALLBACK_ROWS:
        half = QUALITATIVE_FALLBACK_ROWS // 2
        rows = rows[:half] + rows[-half:]
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows, source


def split_qualitative(rows: list[dict], visible: int = QUALITATIVE_VISIBLE) -> dict[str, list[dict]]:
    """Best ``visible`` rows, worst ``visible`` rows, and the rest (shown behind a disclosure element)."""
    if len(rows) <= 2 * visible:
        return {"best": rows, "worst": [], "rest": []}
    return {"best": rows[:visible], "worst": rows[-visible:], "rest": rows[visible:-visible]}


def _training_context(results: dict[str, Any], stats: list[dict[str, Any]], stats_path: Path) -> dict[str, Any]:
    training = results["metrics"].get("training")
    training = _lenient(training) if isinstance(training, dict) else None
    curves = plots.training_curves(stats) if stats else []
    return {
        "summary": training,
        "stats_file": stats_path.name if stats else None,
        "steps_recorded": len(stats),
        "skipped": sum(1 for r in stats if plots.is_skipped(r)),
        "curves": curves,
    }


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc)


def run_context(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Everything the run template needs, from the run's files."""
    samples_path = run_file(run_dir, results, "samples", SAMPLES_FILE)
    stats_path = run_file(run_dir, results, "train_stats", TRAIN_STATS_FILE)
    samples = read_jsonl(samples_path, missing_ok=True)
    stats = read_jsonl(stats_path, missing_ok=True)

    metrics = results["metrics"]
    before, after = _lenient(metrics["before"]), _lenient(metrics["after"])
    comparison = _lenient(metrics.get("comparison"))
    verdict = verdict_context(results)
    bounds_by_name = {b["name"]: b for b in verdict["bounds"]}

    hist = plots.toxicity_histogram([s.get("toxicity_before") for s in samples],
                                    [s.get("toxicity_after") for s in samples]) if samples else None
    means = plots.toxicity_means(before, after)
    qual, qual_source = qualitative_rows(results, samples)
    confidence = comparison.get("confidence")
    env = _lenient(results.get("environment"))
    created = results.get("created")
    return {
        "run_id": str(results.get("run_id") or run_dir.name),
        "created": str(created) if created is not None else None,
        "preset": results.get("preset"),
        "schema_version": results.get("schema_version"),
        "verdict": verdict,
        "baseline": results.get("baseline"),
        "before": before,
        "after": after,
        "comparison": comparison,
        "confidence_pct": f"{100 * confidence:g}%" if _number(confidence) else "95%",
        "toxicity_rows": _metric_rows(before, after, TOXICITY_ROWS, bounds_by_name),
        "quality_rows": _metric_rows(before, after, QUALITY_ROWS, bounds_by_name),
        "improvement_bounds": [bounds_by_name[n] for n in IMPROVEMENT_BOUNDS if n in bounds_by_name],
        "nats_bounds": NATS_BOUNDS,
        "histogram_svg": hist,
        "means_svg": means,
        "samples_file": samples_path.name if samples else None,
        "num_samples": len(samples),
        "training": _training_context(results, stats, stats_path),
        "qualitative": split_qualitative(qual),
        "qualitative_total": len(qual),
        "qualitative_source": qual_source,
        "config": flatten_config(results.get("config")),
        "seeds": results.get("seeds") or {},
        "environment": Lenient({k: v for k, v in env.items() if k != "versions"}),
        "versions": env.get("versions") or {},
        "timings": results.get("timings") or {},
        "files": results.get("files") or {},
        "history_link": (run_dir.parent / PAGE).is_file(),
    }


# --------------------------------------------------------------------------------------------
# writing

def write_atomic(path: Path, text: str) -> Path:
    """Write a page atomically (:func:`harness.results.atomic_write_text`); returns its path."""
    atomic_write_text(path, text)
    return Path(path)


def render_run_html(run_dir: str | Path) -> str:
    """The HTML of a run's page (without writing it)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    return environment().get_template("run.html.j2").render(**run_context(run_dir, results))


def render_run(run_dir: str | Path) -> Path:
    """Render ``run_dir/index.html`` from the run's files and return its path."""
    run_dir = Path(run_dir)
    html = render_run_html(run_dir)
    return write_atomic(run_dir / PAGE, html)


def _index_row(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    metrics = results["metrics"]
    verdict = verdict_context(results)
    env = results.get("environment") or {}
    timings = results.get("timings") or {}
    time = _parse_time(results.get("created"))
    if time is None:  # no usable "created": the file's modification time orders it
        time = datetime.fromtimestamp((run_dir / RESULTS_FILE).stat().st_mtime, tz=timezone.utc)
    commit = env.get("git_commit")
    return {
        "folder": run_dir.name,
        "href": quote(run_dir.name, safe="") + "/" + PAGE,
        "run_id": str(results.get("run_id") or run_dir.name),
        "created": results.get("created"),
        "time": time,
        "when": time.strftime("%Y-%m-%d %H:%M UTC"),
        "preset": results.get("preset"),
        "verdict": verdict,
        "metrics": metrics,
        "before": metrics["before"].get("toxicity_mean"),
        "after": metrics["after"].get("toxicity_mean"),
        "improvement": (metrics.get("comparison") or {}).get("mean_improvement"),
        "improvement_ci": ((metrics.get("comparison") or {}).get("mean_improvement_ci_low"),
                           (metrics.get("comparison") or {}).get("mean_improvement_ci_high")),
        "kl": metrics["after"].get("kl_per_sequence_mean"),
        "train_kl": (metrics.get("training") or {}).get("objective_kl_mean"),
        "steps": (metrics.get("training") or {}).get("steps"),
        "device": env.get("device"),
        "commit": str(commit)[:8] if commit else None,
        "total_s": timings.get("total_s"),
    }


def collect_runs(reports_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows of every run under ``reports_dir`` (newest first) and the folders whose results.json is broken."""
    runs, broken = [], []
    for d in sorted(p for p in reports_dir.iterdir() if p.is_dir() and (p / RESULTS_FILE).is_file()):
        try:
            runs.append(_index_row(d, load_results(d)))
        except HarnessError as e:
            broken.append({"folder": d.name, "error": str(e)})
    runs.sort(key=lambda r: (r["time"], r["folder"]), reverse=True)
    return runs, broken


def render_index_html(reports_dir: str | Path, *, render_missing: bool = True) -> str:
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        raise _err(reports_dir, "reports folder not found")
    runs, broken = collect_runs(reports_dir)
    if render_missing:  # every row links to a page: render the ones that were never rendered
        for r in runs:
            page = reports_dir / r["folder"] / PAGE
            r["has_page"] = page.is_file()
            if not r["has_page"]:
                try:
                    render_run(reports_dir / r["folder"])
                    r["has_page"] = True
                except HarnessError as e:
                    broken.append({"folder": r["folder"], "error": str(e)})
    else:
        for r in runs:
            r["has_page"] = (reports_dir / r["folder"] / PAGE).is_file()
    chronological = list(reversed(runs))
    newest_bounds = {b["name"]: b["bound"] for b in runs[0]["verdict"]["bounds"]} if runs else {}
    trends = []
    if runs:
        trends = [
            plots.trend_toxicity(chronological),
            plots.trend_improvement(chronological, newest_bounds.get("min_improvement")),
            plots.trend_kl(chronological, newest_bounds.get("max_kl")),
        ]
    return environment().get_template("index.html.j2").render(
        runs=runs, broken=broken, trends=[t for t in trends if t is not None],
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def render_index(reports_dir: str | Path, *, render_missing: bool = True) -> Path:
    """Write ``reports_dir/index.html``: every run folder with a results.json, newest first, with trends.

    Run folders whose page was never rendered get it rendered first (``render_missing``), so that
    every row links to a page; a folder with a broken results.json is listed apart, not fatal.
    """
    reports_dir = Path(reports_dir)
    html = render_index_html(reports_dir, render_missing=render_missing)
    return write_atomic(reports_dir / PAGE, html)
