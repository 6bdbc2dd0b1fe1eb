"""Render a run folder (``results.json`` + ``samples.jsonl`` + ``train_stats.jsonl``) into one HTML page.

The page is self-contained: CSS is inline, the plots are inline SVG, and there is no JavaScript,
no web font and no URL to fetch. Every string that comes from a run (model outputs, prompts,
config values, run ids) goes through Jinja2's autoescaping; the only markup that is inserted
unescaped is the SVG this package draws itself (:mod:`harness.report.plots`).

File formats: ``docs/results-schema.md``. Usage: ``docs/reports.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import jinja2

from ..config import EvalConfig, flatten_dict
from ..errors import HarnessError
from ..results import (
    CURVE_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    TRAIN_STATS_FILE,
    atomic_write_text,
    load_results,
    read_jsonl,
    run_file,
)
from . import plots
from .formats import (  # noqa: F401 - the templates' filters, and names tests read from here
    NOT_MEASURED,
    REWARD_NOISE,
    SCIENTIFIC_BELOW,
    fmt_diff,
    fmt_duration,
    fmt_num,
    fmt_pct,
    fmt_signed,
    fmt_value,
    is_number,
)

PAGE = "index.html"

#: rows shown above the fold at each end of the qualitative table
QUALITATIVE_VISIBLE = 5
#: when ``qualitative`` is missing, at most this many rows are derived from samples.jsonl (half best, half worst)
QUALITATIVE_FALLBACK_ROWS = 40

# --------------------------------------------------------------------------------------------
# reading: the run files' names, schema and readers live in harness.results

def _err(path: Path, message: str, fix: str | None = None) -> HarnessError:
    return HarnessError(message, field=str(path), fix=fix)


# --------------------------------------------------------------------------------------------
# formatting (Jinja filters)

# (the vocabulary itself is harness.report.formats, shared with the terminal's text)


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
    env.filters.update(num=fmt_num, signed=fmt_signed, diff=fmt_diff, pct=fmt_pct, duration=fmt_duration,
                       value=fmt_value)
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


def flatten_config(config: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """``{"ppo": {"steps": 40}}`` -> ``[("ppo.steps", 40)]``, in the config's own order."""
    return list(flatten_dict(config).items()) if config else []


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
            "preset": b.get("preset"),
            "change": str(b.get("change") or ""),
            "reason": str(b.get("reason") or ""),
        })
    passed = verdict.get("passed")
    if not isinstance(passed, bool):
        passed = all(b["passed"] for b in bounds)
    baseline = results.get("baseline")
    if isinstance(baseline, dict) and baseline.get("passed") is False:
        passed = False  # the run exits 1 when a metric left its baseline: the headline says so too
    # "PASS with loosened bounds" is never shown as a plain PASS
    overall = "FAIL" if not passed else ("PASS with loosened bounds" if verdict.get("loosened") else "PASS")
    reasons = [str(r) for r in verdict.get("reasons") or []]
    return {"judged": True, "overall": overall, "bounds": bounds, "held": sum(b["passed"] for b in bounds),
            "reasons": reasons, "loosened": list(verdict.get("loosened") or []),
            "removed": list(verdict.get("removed") or [])}


#: rows of TOXICITY_ROWS that need several samples per prompt: with one they repeat the mean and the toxic rate
PER_PROMPT_ROWS = ("expected_max_toxicity", "toxicity_probability")

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
    ("faithfulness_mean", "faithfulness to the dialogue (NLI)", "num", "max_faithfulness_drop"),
    ("faithful_rate", "faithful summaries (≥ threshold)", "pct", None),
    ("distinct_summary_rate", "distinct summaries over prompts", "pct", "min_distinct_summary_rate"),
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
        change = a - b if is_number(a) and is_number(b) else None
        guard = bounds.get(rest[0]) if rest and rest[0] else None
        rows.append({"key": key, "label": label, "format": form, "before": b, "after": a, "change": change,
                     "guard": guard})
    return rows


def _reward_diff(row: dict[str, Any]) -> float | None:
    d = row.get("reward_diff")
    if is_number(d) and not math.isnan(d):
        return float(d)
    b, a = row.get("reward_before"), row.get("reward_after")
    if is_number(a) and is_number(b) and not (math.isnan(a) or math.isnan(b)):
        return float(a) - float(b)
    return None


def _measured_number(v: Any) -> float | None:
    return float(v) if is_number(v) and not math.isnan(v) else None


def faithful_threshold(results: dict[str, Any]) -> float:
    """``eval.faithful_threshold`` of the run's config (the default when the config does not hold it)."""
    value = ((results.get("config") or {}).get("eval") or {}).get("faithful_threshold")
    return float(value) if is_number(value) else EvalConfig.faithful_threshold


def mark_unfaithful(rows: list[dict], threshold: float) -> None:
    """Each row's ``unfaithful_before`` / ``unfaithful_after``: its summary scored below ``threshold`` (a
    summary that was not scored is not marked), and ``unfaithful``: either one is."""
    for r in rows:
        for phase in ("before", "after"):
            v = r.get(f"faithfulness_{phase}")
            r[f"unfaithful_{phase}"] = v is not None and v < threshold
        r["unfaithful"] = r["unfaithful_before"] or r["unfaithful_after"]


def page_qualitative_rows(results: dict[str, Any], samples: list[dict[str, Any]]) -> tuple[list[dict], str]:
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
            "faithfulness_before": _measured_number(r.get("faithfulness_before")),
            "faithfulness_after": _measured_number(r.get("faithfulness_after")),
            "reward_diff": _reward_diff(r),
        })
    rows.sort(key=lambda r: (r["reward_diff"] is None, -(r["reward_diff"] or 0.0)))
    if source == SAMPLES_FILE and len(rows) > QUALITATIVE_FALLBACK_ROWS:
        half = QUALITATIVE_FALLBACK_ROWS // 2
        rows = rows[:half] + rows[-half:]
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows, source


def split_qualitative(rows: list[dict], visible: int = QUALITATIVE_VISIBLE,
                       noise: float = REWARD_NOISE) -> dict[str, Any]:
    """The largest real gains and losses, and the rest (shown behind a disclosure element).

    ``rows`` are ranked best first. ``best`` holds at most ``visible`` rows whose reward rose by
    ``noise`` or more, ``worst`` at most ``visible`` rows whose reward fell by ``noise`` or more (the
    last such rows of the ranking); a smaller difference is no change and never listed as a gain or a
    loss. With ``2 * visible`` rows or fewer, every row is in ``best`` ("all rows") and ``split`` is
    False. ``rest`` keeps the ranking's order.
    """
    if len(rows) <= 2 * visible:
        return {"split": False, "best": rows, "worst": [], "rest": [], "rest_ranks": None}
    gains = [r for r in rows if r["reward_diff"] is not None and r["reward_diff"] >= noise]
    losses = [r for r in rows if r["reward_diff"] is not None and r["reward_diff"] <= -noise]
    best, worst = gains[:visible], losses[-visible:] if losses else []
    shown = {id(r) for r in best + worst}
    rest = [r for r in rows if id(r) not in shown]
    ranks = [r["rank"] for r in rest]
    contiguous = bool(ranks) and ranks == list(range(ranks[0], ranks[0] + len(ranks)))
    return {"split": True, "best": best, "worst": worst, "rest": rest,
            "rest_ranks": (ranks[0], ranks[-1]) if contiguous else None}


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


def curve_context(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The over-optimisation curve of the run (``curve.jsonl``; None when the run has none): its plots, its
    summary (``metrics.curve``, or made from the file for a curve made after the run by ``detox-harness curve``)
    and its rows."""
    from ..metrics import curve_summary
    from ..results import read_curve  # noqa: I001 (one reader of the curve, as the run wrote it)

    try:
        rows = read_curve(run_dir)
    except HarnessError as e:
        return {"error": str(e), "rows": [], "plots": [], "summary": Lenient({})}
    if not rows:
        return None
    summary = (results["metrics"].get("curve") or curve_summary(rows))
    selected = (summary.get("selected") or {}).get("step")
    final = summary.get("final_step")
    plots_ = [plots.curve_improvement(rows, "kl", selected=selected, final=final),
              plots.curve_improvement(rows, "step", selected=selected, final=final), plots.curve_quality(rows)]
    return {"error": None, "rows": rows, "plots": [p for p in plots_ if p is not None], "summary": _lenient(summary),
            "selected_step": selected, "final_step": final, "file": CURVE_FILE,
            "in_results": bool(results["metrics"].get("curve"))}


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


POLICY_ROWS = [  # (key, label, format): the policies table of a run that started from an adapter
    ("toxicity_mean", "mean toxicity", "num"),
    ("toxic_rate", "toxic rate", "pct"),
    ("second_toxicity_mean", "second-classifier toxicity", "num"),
    ("rougeL", "ROUGE-L (test prompts)", "num"),
    ("length_mean", "mean length, tokens", "num"),
]


def policies_context(results: dict[str, Any]) -> dict[str, Any] | None:
    """Base, start (the warm-start adapter) and after PPO side by side, when the run started from an adapter."""
    policies = results.get("policies")
    if not isinstance(policies, dict) or not isinstance(policies.get("base"), dict):
        return None
    metrics = results.get("metrics") or {}
    columns = [_lenient(policies["base"]), _lenient(metrics.get("before")), _lenient(metrics.get("after"))]
    rows = [{"label": label, "format": fmt, "values": [c.get(key) for c in columns]} for key, label, fmt in POLICY_ROWS]
    start = _lenient(policies.get("start"))
    saved = start.get("sft") if isinstance(start.get("sft"), dict) else None
    sft = _lenient(metrics.get("sft")) if saved else None
    first = (saved or {}).get("result", {}).get("validation", [{}])
    return {"rows": rows, "adapter": start.get("adapter"), "sft": sft,
            "sft_start": _lenient(first[0]) if saved and len(first) > 1 else None,
            "headers": ["base (adapters off)", "start: after SFT" if saved else "start: the adapter", "after PPO"]}


def run_context(run_dir: Path, results: dict[str, Any], history_link: bool | None = None) -> dict[str, Any]:
    """Everything the run template needs, from the run's files.

    ``history_link``: whether the page links to ``../index.html`` (the history page); None: when that
    page exists already. :func:`render_index` re-renders a page that lacks the link when it writes the
    history page for the first time, so the first run of a reports folder links to it too.
    """
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
    qual, qual_source = page_qualitative_rows(results, samples)
    threshold = faithful_threshold(results)
    mark_unfaithful(qual, threshold)
    confidence = comparison.get("confidence")
    env = _lenient(results.get("environment"))
    created = results.get("created")
    per_prompt = comparison.get("samples_per_prompt")
    single_sample = is_number(per_prompt) and per_prompt <= 1
    toxicity_rows = _metric_rows(before, after, TOXICITY_ROWS, bounds_by_name)
    hidden_rows = []
    if single_sample:  # k = 1: the expected maximum is the mean, the probability of >= 1 toxic is the toxic rate
        hidden_rows = [r for r in toxicity_rows if r["key"] in PER_PROMPT_ROWS]
        toxicity_rows = [r for r in toxicity_rows if r["key"] not in PER_PROMPT_ROWS]
    if history_link is None:
        history_link = (run_dir.parent / PAGE).is_file()
    return {
        "run_id": str(results.get("run_id") or run_dir.name),
        "created": str(created) if created is not None else None,
        "preset": results.get("preset"),
        "schema_version": results.get("schema_version"),
        "verdict": verdict,
        "baseline": results.get("baseline"),
        "policies": policies_context(results),
        "before": before,
        "after": after,
        "comparison": comparison,
        "confidence_pct": f"{100 * confidence:g}%" if is_number(confidence) else "95%",
        "toxicity_rows": toxicity_rows,
        "hidden_toxicity_rows": hidden_rows,
        "quality_rows": _metric_rows(before, after, QUALITY_ROWS, bounds_by_name),
        "improvement_bounds": [bounds_by_name[n] for n in IMPROVEMENT_BOUNDS if n in bounds_by_name],
        "nats_bounds": NATS_BOUNDS,
        "histogram_svg": hist,
        "means_svg": means,
        "samples_file": samples_path.name if samples else None,
        "num_samples": len(samples),
        "training": _training_context(results, stats, stats_path),
        "curve": curve_context(run_dir, results),
        "qualitative": split_qualitative(qual),
        "qualitative_total": len(qual),
        "qualitative_source": qual_source,
        "config": flatten_config(results.get("config")),
        "seeds": results.get("seeds") or {},
        "environment": Lenient({k: v for k, v in env.items() if k != "versions"}),
        "versions": env.get("versions") or {},
        "timings": results.get("timings") or {},
        "files": results.get("files") or {},
        "history_link": history_link,
        "reward_noise": REWARD_NOISE,
        "faithful_threshold": threshold,
        "faithfulness_judged": any(r["faithfulness_before"] is not None or r["faithfulness_after"] is not None
                                   for r in qual),
        "faithfulness_model": ((results.get("config") or {}).get("eval") or {}).get("faithfulness_model"),
        "pinned": pinned_context(results),
    }


#: the models of ``provenance.models`` (harness/provenance.py), as the report names them
PINNED_ROLES = (("policy", "policy"), ("adapter", "starting adapter"), ("reward_model", "reward model"),
                ("second_judge", "second judge"), ("faithfulness_judge", "faithfulness judge"))


def pinned_context(results: dict) -> dict:
    """What the run pinned (results.json ``provenance``): each model's revision, the prompts' fingerprint, and
    where "before" came from; empty for a run written before provenance was recorded."""
    prov = results.get("provenance") if isinstance(results.get("provenance"), dict) else {}
    models = prov.get("models") if isinstance(prov.get("models"), dict) else {}
    rows = []
    for key, role in PINNED_ROLES:
        entry = models.get(key)
        if isinstance(entry, dict):
            rows.append({"role": role, "location": entry.get("location"), "kind": entry.get("kind"),
                         "resolved": bool(entry.get("revision")),
                         "revision": entry.get("revision") or "unresolved (not in the local cache)"})
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    return {"models": rows, "data": data, "before_cache": prov.get("before_cache") or {}}


# --------------------------------------------------------------------------------------------
# writing

#: every page this package writes says so in its head; a page without it is someone else's and is never replaced
GENERATOR = '<meta name="generator" content="detox-harness">'


def require_own_page(path: str | Path) -> None:
    """Refuse (exit 2, nothing written) when ``path`` exists and is not a page this package wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        head = ""
    if not path.is_file() or path.is_symlink() or GENERATOR not in head:
        raise HarnessError("is not a report page of detox-harness, and would be replaced by one", field="report",
                           value=str(path), fix="move that file away, or keep the run elsewhere (--output)")


def write_atomic(path: Path, text: str) -> Path:
    """Write a page atomically (:func:`harness.files.atomic_write_text`), never over a page this package did not
    write (:func:`require_own_page`); returns its path."""
    require_own_page(path)
    atomic_write_text(path, text)
    return Path(path)


def render_run_html(run_dir: str | Path, *, history_link: bool | None = None) -> str:
    """The HTML of a run's page (without writing it); ``history_link`` as in :func:`run_context`."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    return environment().get_template("run.html.j2").render(**run_context(run_dir, results, history_link))


def render_run(run_dir: str | Path, *, history_link: bool | None = None) -> Path:
    """Render ``run_dir/index.html`` from the run's files and return its path.

    The page links to the history page ``../index.html`` when it exists (``history_link=None``), or
    as ``history_link`` says; :func:`render_index` adds the link to pages rendered before it.
    """
    run_dir = Path(run_dir)
    html = render_run_html(run_dir, history_link=history_link)
    return write_atomic(run_dir / PAGE, html)


#: config keys that never split a trend group: seeds (a history varies them on purpose), where the run
#: was written, and the bounds (they judge the measurements, they do not change them)
GROUP_IGNORED_PREFIXES = ("output", "thresholds")
#: hex digits of the configuration hash that names a trend group
GROUP_HASH_DIGITS = 8


#: settings that never split a trend group either: the curve's (its points leave training and the final evaluation
#: as they were, harness/curve.py), so runs made before the curve existed share a group with those made after
GROUP_IGNORED_KEYS = ("eval.curve_every", "eval.curve_prompts")


def _group_ignored(key: str) -> bool:
    parts = key.split(".")
    return parts[0] in GROUP_IGNORED_PREFIXES or parts[-1] in ("seed", "run_id") or key in GROUP_IGNORED_KEYS


def group_settings(config: dict[str, Any] | None) -> dict[str, Any]:
    """The settings of a configuration that decide its trend group (:func:`config_hash`), flattened."""
    return {k: v for k, v in flatten_config(config) if not _group_ignored(k)}


def config_hash(config: dict[str, Any] | None) -> str:
    """A short hash of the configuration minus seeds, ``output`` and ``thresholds``: runs that share it are
    the same experiment repeated, so their figures make one trend."""
    text = json.dumps(sorted(group_settings(config).items()), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:GROUP_HASH_DIGITS]


def _index_row(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    metrics = results["metrics"]
    verdict = verdict_context(results)
    env = results.get("environment") or {}
    timings = results.get("timings") or {}
    time = _parse_time(results.get("created"))
    if time is None:  # no usable "created": the file's modification time orders it
        time = datetime.fromtimestamp((run_dir / RESULTS_FILE).stat().st_mtime, tz=timezone.utc)
    commit = env.get("git_commit")
    trained = isinstance(metrics.get("training"), dict)
    if verdict["judged"] and trained:
        why = None
    elif trained:
        why = "trained, not judged (no bounds)"
    else:
        why = "evaluation only (no training)" + ("" if verdict["judged"] else ", not judged")
    target = results.get("target")
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    return {
        "folder": run_dir.name,
        "href": quote(run_dir.name, safe="") + "/" + PAGE,
        "run_id": str(results.get("run_id") or run_dir.name),
        "created": results.get("created"),
        "time": time,
        "when": time.strftime("%Y-%m-%d %H:%M UTC"),
        "preset": results.get("preset"),
        "verdict": verdict,
        "judged": why is None,
        "why_apart": why,
        "target": str(target) if target else ("base model" if not trained and "target" in results else None),
        "metrics": metrics,
        "group": config_hash(config),
        "settings": group_settings(config),
        "before": metrics["before"].get("toxicity_mean"),
        "after": metrics["after"].get("toxicity_mean"),
        "improvement": (metrics.get("comparison") or {}).get("mean_improvement"),
        "improvement_ci": ((metrics.get("comparison") or {}).get("mean_improvement_ci_low"),
                           (metrics.get("comparison") or {}).get("mean_improvement_ci_high")),
        "confidence": (metrics.get("comparison") or {}).get("confidence"),
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


def _group_trends(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The trend plots of one group of judged runs; the bounds drawn are its newest run's."""
    chronological = list(reversed(group["runs"]))
    newest = group["runs"][0]
    bounds = {b["name"]: b["bound"] for b in newest["verdict"]["bounds"]}
    confidence = newest["confidence"]
    uid = group["key"]
    trends = [
        plots.trend_toxicity(chronological, uid=uid,
                             confidence=f"{100 * confidence:g}%" if is_number(confidence) else "95%"),
        plots.trend_improvement(chronological, _bound(bounds.get("min_improvement")), uid=uid),
        plots.trend_kl(chronological, _bound(bounds.get("max_kl")), uid=uid),
        plots.trend_judge_improvement(chronological, uid=uid),
    ]
    return [t for t in trends if t is not None]


def _bound(v: Any) -> float | None:
    return float(v) if is_number(v) and math.isfinite(v) else None


_UNSET = object()


def group_differences(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings whose value differs between the groups (each group's newest run), in config order."""
    if len(groups) < 2:
        return []
    keys: list[str] = []
    for g in groups:
        keys.extend(k for k in g["runs"][0]["settings"] if k not in keys)
    rows = []
    for k in keys:
        values = [g["runs"][0]["settings"].get(k, _UNSET) for g in groups]
        canonical = {None if v is _UNSET else json.dumps(v, sort_keys=True, default=str) for v in values}
        if len(canonical) > 1:
            rows.append({"key": k, "cells": [None if v is _UNSET else {"value": v} for v in values]})
    return rows


def index_context(reports_dir: Path, runs: list[dict[str, Any]], broken: list[dict[str, str]]) -> dict[str, Any]:
    """What the history page shows: judged runs (headline, trends per configuration) apart from the others."""
    judged = [r for r in runs if r["judged"]]
    apart = [r for r in runs if not r["judged"]]
    groups: dict[str, dict[str, Any]] = {}
    for r in judged:  # newest first: the first group is the newest judged run's
        g = groups.setdefault(r["group"], {"key": r["group"], "preset": r["preset"], "runs": []})
        g["runs"].append(r)
    ordered = list(groups.values())
    for g in ordered:
        g["trends"] = _group_trends(g)
        g["first"], g["last"] = g["runs"][-1]["when"], g["runs"][0]["when"]
    return {
        "runs": runs,
        "judged": judged,
        "apart": apart,
        "latest": judged[0] if judged else None,
        "groups": ordered,
        "differences": group_differences(ordered),
        "multiple_groups": len(ordered) > 1,
        "broken": broken,
        "ignored_prefixes": GROUP_IGNORED_PREFIXES,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _links_history(page: Path) -> bool:
    try:
        return 'href="../index.html"' in page.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def render_index_html(reports_dir: str | Path, *, render_missing: bool = True) -> str:
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        raise _err(reports_dir, "reports folder not found")
    runs, broken = collect_runs(reports_dir)
    first_index = not (reports_dir / PAGE).is_file()
    for r in runs:
        page = reports_dir / r["folder"] / PAGE
        r["has_page"] = page.is_file()
        # every row links to a page: render the ones that were never rendered; the first time the history
        # page is written, pages rendered before it (the first run's) get their link to it
        stale = r["has_page"] and first_index and not _links_history(page)
        if render_missing and (not r["has_page"] or stale):
            try:
                render_run(reports_dir / r["folder"], history_link=True)
                r["has_page"] = True
            except HarnessError as e:
                broken.append({"folder": r["folder"], "error": str(e)})
    return environment().get_template("index.html.j2").render(**index_context(reports_dir, runs, broken))


def render_index(reports_dir: str | Path, *, render_missing: bool = True) -> Path:
    """Write ``reports_dir/index.html``: every run folder with a results.json, newest first, with trends.

    Judged training runs (a verdict and ``metrics.training``) make the headline, the runs table and the
    trends, one set of trend plots per configuration (:func:`config_hash`); evaluation-only and unjudged
    runs are listed in a table of their own. Run folders whose page was never rendered get it rendered
    first (``render_missing``), so that every row links to a page, and when the history page is written
    for the first time, pages rendered before it get their link to it; a folder with a broken
    results.json is listed apart, not fatal.
    """
    reports_dir = Path(reports_dir)
    html = render_index_html(reports_dir, render_missing=render_missing)
    return write_atomic(reports_dir / PAGE, html)
