"""Calibration: each bound's limit proposed from honest seeds by one stated rule, checked against planted runs.

``detox-harness calibrate --preset P --baseline baselines/P.json [--planted FILE]`` reads the honest seeds'
values of every metric a bound reads (the baseline file keeps them) and, per bound:

- the **prediction limit**: the one-sided t prediction limit for one new seed,
  ``mean -+ max(t(1 - alpha / k, n - 1) x sqrt(1 + 1/n) x spread, ABSOLUTE)`` with n seeds and the family
  budget ``alpha`` (:data:`BOUNDS_ALPHA`) split over the k bounds the preset has (Bonferroni): if each metric
  is normal over seeds (log-normal for :data:`harness.baselines.LOG_SCALE`: the KLs and the rates, whose
  limits come from the logs), an honest run fails any bound with probability at most ``alpha``;
- **safe** when the preset's limit is at least as loose as the prediction limit;
- the **proposal**: the preset's limit when it is safe (a principle limit such as "a rate of at most 5%" may
  be stricter than the seeds need, and stays); else the prediction limit rounded outwards to two significant
  figures, never past 0 for a strict bound (">" or "<": those ask for positive evidence, and 0 is "nothing
  happened"). A bound on a relative drop of toxicity (:data:`harness.thresholds.POWERED_BOUNDS`) whose limit
  lies above 0 but below the largest minimum detectable improvement the seeds measured would fail honest runs
  as "not enough evidence": such a limit is not safe, and a strict one is proposed at 0 (significance only);
- the **planted cases** (measurements of runs that must fail, ``--planted``): which of them the limit
  catches now, and which would pass at the proposal.

The baseline's own tolerances spend another :data:`harness.baselines.FAMILY_ALPHA`: bounds and baseline
together, an honest run fails with probability at most their sum (docs/verdicts.md, "False alarms").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .baselines import prediction_band
from .errors import HarnessError
from .thresholds import BOUNDS, OPERATORS, POWERED_BOUNDS, lookup, text_table

#: a whole honest run fails some bound with probability at most this, by design (with the baseline's
#: FAMILY_ALPHA, 5% for bounds and baseline together)
BOUNDS_ALPHA = 0.025


@dataclass
class Proposal:
    bound: str
    op: str
    n: int
    mean: float
    spread: float
    low: float
    high: float
    prediction_limit: float
    limit: float | None  # the preset's
    safe: bool
    proposed: float
    detectable: float | None = None  # the seeds' largest minimum detectable improvement (POWERED_BOUNDS)
    caught: list[str] = field(default_factory=list)  # planted cases the preset's limit fails
    lost: list[str] = field(default_factory=list)  # ... of them, those that would pass at the proposal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_sided_factor(n: int, k: int, alpha: float = BOUNDS_ALPHA) -> float:
    """``t(1 - alpha / k, n - 1) x sqrt(1 + 1/n)``: a one-sided prediction limit for one new seed, in spreads."""
    from scipy import stats

    if n < 2 or k < 1:
        raise ValueError(f"one_sided_factor needs n >= 2 seeds and k >= 1 bounds, got n={n}, k={k}")
    return float(stats.t.ppf(1 - alpha / k, n - 1) * math.sqrt(1 + 1 / n))


def round_outwards(value: float, lower: bool, digits: int = 2) -> float:
    """``value`` to ``digits`` significant figures, rounded down for a lower limit and up for an upper one."""
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    rounded = (math.floor if lower else math.ceil)(value * scale) / scale
    return float(f"{rounded:.{digits + 6}g}")


def _passes(value: float | None, op: str, limit: float) -> bool:
    return value is not None and OPERATORS[op](value, limit)


def propose(baseline: dict, bounds: dict[str, float], planted: dict[str, dict] | None = None,
            alpha: float = BOUNDS_ALPHA) -> list[Proposal]:
    """One :class:`Proposal` per bound of ``bounds`` whose metric the baseline holds.

    ``planted``: ``{case: results metrics dict}`` of runs that must fail (bench/false_alarms.py writes them).
    """
    measured = {name: BOUNDS[name] for name in bounds if ".".join(BOUNDS[name][0]) in baseline["metrics"]}
    if not measured:
        raise HarnessError("the baseline holds none of the preset's bound metrics", field="--baseline",
                           fix="make the baseline of this preset: detox-harness baseline --preset P")
    out = []
    for name, (path, op, _) in measured.items():
        m = baseline["metrics"][".".join(path)]
        n = len(m["values"])
        lower = op in (">=", ">")
        low, high, _ = prediction_band(".".join(path), m["values"], one_sided_factor(n, len(measured), alpha))
        predicted = low if lower else high
        limit = bounds.get(name)
        detectable = (baseline.get("detectable") or {}).get(".".join(POWERED_BOUNDS[name])) \
            if name in POWERED_BOUNDS else None

        def resolvable(x: float) -> bool:  # a powered limit above 0 but below the detectable improvement is not
            return detectable is None or x <= 0 or x >= detectable

        safe = limit is not None and (limit <= predicted if lower else limit >= predicted) and resolvable(limit)
        if safe:
            proposed = float(limit)
        else:
            proposed = round_outwards(predicted, lower)
            if op == ">":
                proposed = max(proposed, 0.0)
            elif op == "<":
                proposed = min(proposed, 0.0)
            if not resolvable(proposed) and op == ">":
                proposed = 0.0
        p = Proposal(name, op, n, m["mean"], m["spread"], m["min"], m["max"], predicted, limit, safe, proposed,
                     detectable)
        for case, metrics in (planted or {}).items():
            value = lookup(metrics, path)
            value = value if isinstance(value, (int, float)) else None
            if limit is not None and not _passes(value, op, limit):
                p.caught.append(case)
                if _passes(value, op, proposed):
                    p.lost.append(case)
        out.append(p)
    return out


def format_proposals(proposals: list[Proposal], planted: bool) -> str:
    def g(x):
        return "-" if x is None else f"{x:.4g}"

    header = ("bound", "op", "honest seeds", "prediction limit", "detectable", "limit", "safe", "proposed")
    header += ("planted caught", "would pass at proposed") if planted else ()
    rows = []
    for p in proposals:
        row = (p.bound, p.op, f"{p.low:.4g}..{p.high:.4g} (n={p.n})", g(p.prediction_limit), g(p.detectable),
               g(p.limit),
               "yes" if p.safe else "NO", g(p.proposed))
        row += (", ".join(p.caught) or "-", ", ".join(p.lost) or "-") if planted else ()
        rows.append(row)
    unsafe = [p.bound for p in proposals if not p.safe]
    lost = sorted({c for p in proposals for c in p.lost})
    summary = (f"\n{len(proposals) - len(unsafe)} of {len(proposals)} limits are safe (an honest seed fails any "
               f"bound with probability <= {BOUNDS_ALPHA:g} under normality)"
               + (f"; to move: {', '.join(unsafe)}" if unsafe else ""))
    if planted:
        summary += (f"\nplanted cases a moved limit would let through on that bound: {', '.join(lost)}" if lost
                    else "\nevery planted case a limit catches now is still caught at the proposals")
    return text_table(header, rows) + summary


def toml_section(preset: str, proposals: list[Proposal]) -> str:
    """The proposals as a ``thresholds.toml`` table, each line saying where its number comes from."""
    lines = [f"[{preset}]"]
    for p in proposals:
        if p.safe:
            why = "kept: at least as loose as the prediction limit"
        elif p.proposed == 0 and p.detectable is not None and 0 < p.prediction_limit < p.detectable:
            why = f"significance only: below the detectable improvement {p.detectable:.3g}, the prediction limit"
        elif p.proposed == 0 and p.op in (">", "<"):
            why = "0, 'nothing happened', for a strict bound: the prediction limit"
        else:
            why = "prediction limit, rounded outwards"
        lines.append(f"{p.bound} = {p.proposed:g}  # {why} {p.prediction_limit:.4g}; honest {p.low:.4g}..{p.high:.4g}")
    return "\n".join(lines)
