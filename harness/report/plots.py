"""Plots of a run (and of the run history) as inline SVG strings.

Every figure is a :class:`matplotlib.figure.Figure` drawn with the Agg-free SVG backend; nothing
touches ``pyplot`` or its global figure registry. The returned SVG has its XML prolog, DOCTYPE and
metadata stripped, no fixed width/height (it scales with its container through ``viewBox``) and
text kept as ``<text>`` elements (``svg.fonttype = none``), so labels are searchable in the DOM
and the file stays small. Titles and axis labels are fixed strings of this module; data values
only ever become numbers in the plot, never text taken from model output.
"""

from __future__ import annotations

import io
import math
import re
from datetime import datetime
from typing import Any, Iterable, Sequence

import matplotlib
from markupsafe import Markup
from matplotlib.figure import Figure

BEFORE_COLOR = "#d1495b"  # warm red: the model before PPO
AFTER_COLOR = "#1f77b4"  # blue: the model after PPO
ACCENT_COLOR = "#2a9d8f"
BOUND_COLOR = "#6c757d"

_RC = {
    "svg.fonttype": "none",
    "font.family": ["DejaVu Sans", "sans-serif"],
    "font.size": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 10.0,
    "axes.titleweight": "bold",
    "legend.frameon": False,
    "legend.fontsize": 8.0,
}

_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_SVG_OPEN = re.compile(r"<svg\b[^>]*>")
_SIZE_ATTR = re.compile(r'\s(width|height)="[^"]*"')
_VIEWBOX = re.compile(r'\sviewBox="[-\d.]+ [-\d.]+ ([\d.]+) [\d.]+"')
_ID_REF = re.compile(r'(\sid="|url\(#|href="#)([^"()]+)')


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def _as_float(v: Any) -> float:
    """A number for plotting: missing and non-numeric values become NaN (a gap in a line)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def to_svg(fig: Figure, name: str, label: str, uid: str | None = None) -> Markup:
    """Serialize ``fig`` to inline SVG markup.

    ``name`` becomes ``data-plot``; it (with ``uid`` when one page holds several plots of the same name)
    salts matplotlib's element ids so that several SVGs on one page never share an id; ``label`` becomes
    the accessible name (``aria-label``) of the plot.
    """
    salt = f"{name}-{uid}" if uid else name
    buf = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"detox-{salt}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = _PROLOG.sub("", buf.getvalue(), count=1)
    text = _METADATA.sub("", text, count=1)
    # matplotlib numbers its ids per figure (figure_1, axes_1, ...): prefix them so that the SVGs on
    # one page never share an id, and keep every internal reference (clip paths, glyphs) pointing home
    text = _ID_REF.sub(lambda m: f"{m.group(1)}{salt}-{m.group(2)}", text)
    match = _SVG_OPEN.search(text)
    if match is None:  # pragma: no cover - matplotlib always writes an <svg> element
        raise RuntimeError("matplotlib wrote no <svg> element")
    opening = _SIZE_ATTR.sub("", match.group(0))
    label = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    # the drawing's own width (viewBox units, in which its text is 8-9 high): a narrow screen never draws it much
    # smaller than that (the page's CSS, --plot-width), so the text stays readable and a wide plot scrolls instead
    box = _VIEWBOX.search(opening)
    width = f' style="--plot-width: {float(box.group(1)):.0f}px"' if box else ""
    opening = opening[:-1] + f' class="plot" role="img" aria-label="{label}" data-plot="{name}"{width}>'
    # markupsafe: the SVG is matplotlib's own output (text in it is escaped by matplotlib), and the one value
    # inserted here, the label, is escaped above
    return Markup(text[: match.start()] + opening + text[match.end():].strip())  # noqa: S704


def _styled(fn):
    """Build the figure under the module's rc settings (tick sizes, grid, spines are read at creation)."""

    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_styled
def toxicity_histogram(before: Sequence[Any], after: Sequence[Any], *, bins: int = 20) -> Markup | None:
    """Overlaid histograms of per-sample toxicity before and after training (None without data)."""
    b, a = _finite(before), _finite(after)
    if not b and not a:
        return None
    hi = max([1.0, *b, *a])
    lo = min([0.0, *b, *a])
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    fig = _new_figure(6.4, 3.4)
    ax = fig.add_subplot()
    for values, color, name in ((b, BEFORE_COLOR, "before"), (a, AFTER_COLOR, "after")):
        if not values:
            continue
        mean = sum(values) / len(values)
        ax.hist(values, bins=edges, color=color, alpha=0.45, label=f"{name} (n={len(values)}, mean {mean:.3f})")
        ax.hist(values, bins=edges, color=color, histtype="step", linewidth=1.4)
        ax.axvline(mean, color=color, linestyle="--", linewidth=1.2)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("toxicity of a summary (probability of the toxic label)")
    ax.set_ylabel("number of summaries")
    ax.set_title("Toxicity before vs after PPO")
    ax.legend(loc="upper center")
    return to_svg(fig, "toxicity-histogram", "Histogram of per-summary toxicity before and after PPO")


@_styled
def toxicity_means(before: dict[str, Any], after: dict[str, Any]) -> Markup | None:
    """Mean toxicity before and after with their confidence intervals (None without means)."""
    rows = []
    for name, m, color in (("before", before, BEFORE_COLOR), ("after", after, AFTER_COLOR)):
        mean = _as_float(m.get("toxicity_mean"))
        if math.isnan(mean):
            continue
        lo, hi = _as_float(m.get("toxicity_ci_low")), _as_float(m.get("toxicity_ci_high"))
        rows.append((name, mean, lo, hi, color))
    if not rows:
        return None
    fig = _new_figure(3.6, 3.4)
    ax = fig.add_subplot()
    top = 0.0
    for x, (name, mean, lo, hi, color) in enumerate(rows):
        err = None
        if not (math.isnan(lo) or math.isnan(hi)):
            err = [[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]]
            top = max(top, hi)
        top = max(top, mean)
        ax.bar([x], [mean], width=0.55, color=color, alpha=0.35, edgecolor=color)
        ax.errorbar([x], [mean], yerr=err, fmt="o", color=color, capsize=8, markersize=6, linewidth=2)
        ax.annotate(f"{mean:.3f}", (x, mean), textcoords="offset points", xytext=(16, -3), fontsize=8,
                    color=color)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, max(top * 1.15, 1e-3))
    ax.set_xlabel("model")
    ax.set_ylabel("mean toxicity (bars: 95% interval)")
    ax.set_title("Mean toxicity")
    ax.grid(axis="x", visible=False)
    return to_svg(fig, "toxicity-means", "Mean toxicity before and after PPO with 95% intervals")


# (statistic key, title, y-axis label)
TRAINING_CURVES: list[tuple[str, str, str]] = [
    ("objective/kl", "objective/kl", "KL(policy || ref), nats"),
    ("objective/kl_coef", "objective/kl_coef", "KL coefficient β"),
    ("env/reward_mean", "env/reward_mean", "mean reward"),
    ("ppo/returns/mean", "ppo/returns/mean", "mean return"),
    ("ppo/loss/policy", "ppo/loss/policy", "policy loss"),
    ("ppo/loss/value", "ppo/loss/value", "value loss"),
    ("ppo/policy/clipfrac", "ppo/policy/clipfrac", "clipped fraction"),
    ("objective/entropy", "objective/entropy", "entropy, nats"),
    ("tokens/responses_len_mean", "tokens/responses_len_mean", "response length, tokens"),
]


def is_skipped(row: dict[str, Any]) -> bool:
    """Whether a train_stats.jsonl row is a step whose update was skipped (a non-finite reward or loss).

    The trainer writes ``skipped`` as the float ``1.0`` or ``0.0`` (:func:`harness.ppo.step.ppo_step`), so
    it is read by truthiness, as the trainer and :func:`harness.metrics.training_summary` read it.
    """
    return bool(row.get("skipped"))


@_styled
def training_curve(stats: Sequence[dict[str, Any]], key: str, title: str, ylabel: str) -> Markup | None:
    """One PPO statistic per step (None when no step recorded it). Skipped steps are marked."""
    steps, values, skipped = [], [], []
    for i, row in enumerate(stats):
        step = row.get("step", i)
        step = _as_float(step)
        if math.isnan(step):
            step = float(i)
        value = _as_float(row.get(key))
        steps.append(step)
        values.append(value)
        if is_skipped(row):
            skipped.append(step)
    if not _finite(values):
        return None
    fig = Figure(figsize=(3.9, 2.5))  # fixed margins: constrained layout costs half the render time
    fig.subplots_adjust(left=0.19, right=0.97, bottom=0.18, top=0.89)
    ax = fig.add_subplot()
    ax.plot(steps, values, color=AFTER_COLOR, linewidth=1.4, marker="o" if len(steps) <= 30 else None,
            markersize=2.5)
    for i, s in enumerate(skipped):
        ax.axvline(s, color=BEFORE_COLOR, alpha=0.5, linewidth=1, label="skipped step" if i == 0 else None)
    if skipped:
        ax.legend(loc="best")
    ax.set_xlabel("PPO step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")
    return to_svg(fig, f"train-{slug}", f"{title} per PPO step")


def training_curves(stats: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every curve of :data:`TRAINING_CURVES`: ``{"key", "title", "svg"}`` (``svg`` None if not recorded)."""
    return [{"key": key, "title": title, "svg": training_curve(stats, key, title, ylabel)}
            for key, title, ylabel in TRAINING_CURVES]


def _date_axis(ax, times: list[datetime]) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=2, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if len(times) == 1 or min(times) == max(times):
        from datetime import timedelta

        ax.set_xlim(times[0] - timedelta(hours=12), times[0] + timedelta(hours=12))
    ax.set_xlabel("run created (UTC)")


def _errbar(ax, times, means, lows, highs, color, label, marker="o") -> tuple[bool, bool]:
    """Points with error bars; returns (anything drawn, any interval drawn)."""
    pts = [(t, m, lo, hi) for t, m, lo, hi in zip(times, means, lows, highs) if not math.isnan(m)]
    if not pts:
        return False, False
    t = [p[0] for p in pts]
    m = [p[1] for p in pts]
    lo = [p[1] - p[2] if not math.isnan(p[2]) else 0.0 for p in pts]
    hi = [p[3] - p[1] if not math.isnan(p[3]) else 0.0 for p in pts]
    ax.errorbar(t, m, yerr=[[max(x, 0.0) for x in lo], [max(x, 0.0) for x in hi]], color=color, marker=marker,
                markersize=4, capsize=3, linewidth=1.3, label=label)
    intervals = any(not (math.isnan(p[2]) or math.isnan(p[3])) for p in pts)
    return True, intervals


def _bound_text(value: float, percent: bool) -> str:
    return f"{100 * value:g}%" if percent else f"{value:g}"


def _trend(name: str, svg: Markup, caption: list[str]) -> dict[str, Any]:
    """A trend plot and its caption; the caption names only what the plot draws."""
    return {"name": name, "svg": svg, "caption": "; ".join(caption) + "."}


def _points(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


@_styled
def trend_toxicity(runs: Sequence[dict[str, Any]], *, uid: str | None = None,
                   confidence: str = "95%") -> dict[str, Any] | None:
    """Mean toxicity before and after of each run (``runs`` oldest first, each with ``time`` and ``metrics``).

    Returns ``{"name", "svg", "caption"}`` (None when no run measured a mean).
    """
    times = [r["time"] for r in runs]
    fig = _new_figure(4.2, 2.8)
    ax = fig.add_subplot()
    drawn, intervals, counts = [], False, []
    for phase, color, colour_name in (("before", BEFORE_COLOR, "red"), ("after", AFTER_COLOR, "blue")):
        ms = [r["metrics"].get(phase) or {} for r in runs]
        means = [_as_float(m.get("toxicity_mean")) for m in ms]
        d, i = _errbar(ax, times, means, [_as_float(m.get("toxicity_ci_low")) for m in ms],
                       [_as_float(m.get("toxicity_ci_high")) for m in ms], color, phase)
        if d:
            drawn.append(f"{phase} PPO ({colour_name})")
            counts.append(sum(not math.isnan(v) for v in means))
        intervals |= i
    if not drawn:
        return None
    _date_axis(ax, times)
    ax.set_ylabel("mean toxicity")
    ax.set_title("Mean toxicity per run")
    ax.legend(loc="best")
    caption = [f"Mean toxicity {' and '.join(drawn)}, one point per run ({_points(max(counts))}), by creation time"]
    if intervals:
        caption.append(f"bars: each run's {confidence} interval")
    return _trend("trend-toxicity", to_svg(fig, "trend-toxicity", "Mean toxicity before and after PPO for each run",
                                           uid), caption)


@_styled
def trend_improvement(runs: Sequence[dict[str, Any]], bound: float | None = None, *, uid: str | None = None,
                      bound_name: str = "min_improvement") -> dict[str, Any] | None:
    """Relative mean-toxicity improvement of each run with its bootstrap interval (``bound``: a dashed line)."""
    times = [r["time"] for r in runs]
    cs = [r["metrics"].get("comparison") or {} for r in runs]
    fig = _new_figure(4.2, 2.8)
    ax = fig.add_subplot()
    means = [_as_float(c.get("mean_improvement")) for c in cs]
    drawn, intervals = _errbar(ax, times, means, [_as_float(c.get("mean_improvement_ci_low")) for c in cs],
                               [_as_float(c.get("mean_improvement_ci_high")) for c in cs], ACCENT_COLOR,
                               "improvement")
    if not drawn:
        return None
    caption = [f"Relative drop of mean toxicity, one point per run ({_points(sum(not math.isnan(v) for v in means))})"]
    if intervals:
        caption.append("bars: bootstrap intervals")
    if bound is not None and math.isfinite(bound):
        ax.axhline(bound, color=BOUND_COLOR, linestyle="--", linewidth=1, label="bound (newest run)")
        caption.append(f"dashed line: the newest run's bound {bound_name} = {_bound_text(bound, True)}")
    ax.axhline(0.0, color="black", linewidth=0.6)
    caption.append("thin black line: no change")
    _date_axis(ax, times)
    ax.set_ylabel("relative drop of mean toxicity")
    ax.set_title("Improvement per run")
    ax.legend(loc="best")
    return _trend("trend-improvement", to_svg(fig, "trend-improvement",
                                              "Relative improvement of mean toxicity for each run", uid), caption)


@_styled
def trend_kl(runs: Sequence[dict[str, Any]], bound: float | None = None, *, uid: str | None = None,
             bound_name: str = "max_kl") -> dict[str, Any] | None:
    """KL of each run: evaluation KL per sequence and mean training objective/kl (``bound``: a dashed line)."""
    times = [r["time"] for r in runs]
    fig = _new_figure(4.2, 2.8)
    ax = fig.add_subplot()
    drawn = []
    series = (
        (lambda m: (m.get("after") or {}).get("kl_per_sequence_mean"), AFTER_COLOR, "eval KL / sequence", "o",
         "evaluation KL per sequence (circles)"),
        (lambda m: (m.get("training") or {}).get("objective_kl_mean"), ACCENT_COLOR, "train objective/kl", "s",
         "mean training objective/kl (squares)"),
    )
    for get, color, label, marker, words in series:
        values = [_as_float(get(r["metrics"])) for r in runs]
        pts = [(t, v) for t, v in zip(times, values) if not math.isnan(v)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, markersize=4,
                    linewidth=1.3, label=label)
            drawn.append(f"{words[:-1]}, {_points(len(pts))})")
    if not drawn:
        return None
    caption = [f"KL from the reference model in nats, one point per run: {' and '.join(drawn)}"]
    if bound is not None and math.isfinite(bound):
        ax.axhline(bound, color=BOUND_COLOR, linestyle="--", linewidth=1, label="bound (newest run)")
        caption.append(f"dashed line: the newest run's bound {bound_name} = {_bound_text(bound, False)}")
    _date_axis(ax, times)
    ax.set_ylabel("KL, nats")
    ax.set_title("KL per run")
    ax.legend(loc="best")
    return _trend("trend-kl", to_svg(fig, "trend-kl", "KL divergence from the reference model for each run", uid),
                  caption)


JUDGE_COLOR = "#e9a03b"  # amber: the second, independent judge


def _mark(ax, xs, ys, steps, step, marker, color, label) -> bool:
    """A hollow marker on the point of ``step`` of the series (xs, ys); False when that step is not drawn."""
    for x, y, s in zip(xs, ys, steps):
        if s == step and not math.isnan(x) and not math.isnan(y):
            ax.plot([x], [y], linestyle="none", marker=marker, markersize=11, markerfacecolor="none",
                    markeredgecolor=color, markeredgewidth=1.6, label=label)
            return True
    return False


@_styled
def curve_improvement(rows: Sequence[dict[str, Any]], x: str, *, selected: int | None = None,
                      final: int | None = None) -> dict[str, Any] | None:
    """The over-optimisation curve: improvement by the reward model and by the second judge against ``x``
    (``"kl"``: KL to the reference, on a square-root axis as Gao et al. draw it; ``"step"``), the selected point
    (a circle) and the final one (a square) marked. ``rows``: curve.jsonl. ``{"name", "svg", "caption"}``."""
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    steps = [r.get("step") for r in rows]
    xs = [_as_float(r.get(x)) for r in rows]
    if x == "kl":
        xs = [math.sqrt(max(v, 0.0)) if not math.isnan(v) else v for v in xs]
    rm = [_as_float(r.get("improvement")) for r in rows]
    judge = [_as_float(r.get("second_improvement")) for r in rows]
    if not _finite(rm) and not _finite(judge):
        return None
    fig = Figure(figsize=(4.4, 2.9))
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.17, top=0.89)
    ax = fig.add_subplot()
    caption = [f"Relative drop of mean toxicity since step 0 on the curve's prompts, {len(rows)} "
               f"point{'' if len(rows) == 1 else 's'} in step order: by the reward model (blue circles) and by the "
               "second judge (amber squares)"]
    ax.plot(xs, rm, color=AFTER_COLOR, marker="o", markersize=3.5, linewidth=1.4, label="reward model")
    if _finite(judge):
        ax.plot(xs, judge, color=JUDGE_COLOR, marker="s", markersize=3.5, linewidth=1.4, label="second judge")
    else:
        caption.append("no second judge")
    if selected is not None and _mark(ax, xs, judge, steps, selected, "o", "black", f"selected (step {selected})"):
        caption.append(f"large black ring: the selected point (step {selected})")
    if final is not None and _mark(ax, xs, judge if _finite(judge) else rm, steps, final, "s", BEFORE_COLOR,
                                   f"final (step {final})"):
        caption.append(f"large red square: the final policy (step {final})")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("sqrt(KL to the reference, nats)" if x == "kl" else "PPO step")
    ax.set_ylabel("relative drop of toxicity")
    title = "Improvement against KL" if x == "kl" else "Improvement per step"
    ax.set_title(title)
    ax.legend(loc="best")
    name = f"curve-improvement-{x}"
    return _trend(name, to_svg(fig, name, f"{title}: reward model and second judge"), caption)


@_styled
def curve_quality(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The curve's quality figures per step: ROUGE-L, faithfulness, degenerate rate and length ratio."""
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    steps = [_as_float(r.get("step")) for r in rows]
    series = (("rouge_l", "ROUGE-L", AFTER_COLOR, "o"), ("faithfulness_mean", "faithfulness", ACCENT_COLOR, "s"),
              ("degenerate_rate", "degenerate rate", BEFORE_COLOR, "^"),
              ("length_ratio", "length / step 0", BOUND_COLOR, "D"))
    fig = Figure(figsize=(4.4, 2.9))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.17, top=0.89)
    ax = fig.add_subplot()
    drawn = []
    for key, label, color, marker in series:
        values = [_as_float(r.get(key)) for r in rows]
        if _finite(values):
            ax.plot(steps, values, color=color, marker=marker, markersize=3.5, linewidth=1.3, label=label)
            drawn.append(label)
    if not drawn:
        return None
    ax.set_xlabel("PPO step")
    ax.set_ylabel("value")
    ax.set_title("Quality per step")
    ax.legend(loc="best")
    return _trend("curve-quality", to_svg(fig, "curve-quality", "Summary quality at each curve point"),
                  [f"On the curve's prompts at each point: {', '.join(drawn)}"])


@_styled
def trend_judge_improvement(runs: Sequence[dict[str, Any]], *, uid: str | None = None) -> dict[str, Any] | None:
    """The second judge's improvement of each run: at the end (filled) and at the curve's peak (hollow)."""
    times = [r["time"] for r in runs]
    final = [_as_float((r["metrics"].get("comparison") or {}).get("second_mean_improvement")) for r in runs]
    peak = [_as_float((r["metrics"].get("curve") or {}).get("peak_second_improvement")) for r in runs]
    if not _finite(final):
        return None
    fig = _new_figure(4.2, 2.8)
    ax = fig.add_subplot()
    pts = [(t, v) for t, v in zip(times, final) if not math.isnan(v)]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=JUDGE_COLOR, marker="o", markersize=4, linewidth=1.3,
            label="at the end")
    caption = [f"Relative drop of mean toxicity by the second judge, one point per run ({_points(len(pts))}), "
               "at the end of the run (filled circles)"]
    peaks = [(t, v) for t, v in zip(times, peak) if not math.isnan(v)]
    if peaks:
        ax.plot([p[0] for p in peaks], [p[1] for p in peaks], linestyle="none", marker="o", markersize=7,
                markerfacecolor="none", markeredgecolor=JUDGE_COLOR, label="curve peak")
        caption.append(f"hollow circles: the peak of its curve ({_points(len(peaks))})")
    ax.axhline(0.0, color="black", linewidth=0.6)
    _date_axis(ax, times)
    ax.set_ylabel("relative drop (second judge)")
    ax.set_title("Judge's improvement per run")
    ax.legend(loc="best")
    return _trend("trend-judge", to_svg(fig, "trend-judge", "Second judge's improvement for each run", uid), caption)
