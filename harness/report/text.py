"""The terminal's text of a run: one evaluation's headline and the before/after table, in the report's vocabulary
(:mod:`harness.report.formats`: a figure that was not measured reads "not measured" here too)."""

from __future__ import annotations

from ..thresholds import text_table
from .formats import fmt_num, fmt_pct

#: the before/after table's rows: (metric key, label)
SUMMARY_ROWS = (("toxicity_mean", "toxicity mean"), ("toxicity_std", "toxicity std"),
                ("toxic_rate", "share toxic (>= threshold)"), ("reward_mean", "reward mean"),
                ("faithfulness_mean", "faithfulness mean"), ("faithful_rate", "share faithful (>= threshold)"),
                ("rougeL", "ROUGE-L"), ("empty_rate", "empty outputs"), ("length_mean", "length (tokens)"),
                ("distinct_summary_rate", "distinct summaries (share)"),
                ("kl_per_sequence_mean", "KL to reference (nats/seq)"))


def phase_line(m: dict) -> str:
    """One evaluation's headline figures."""
    faithful = m.get("faithful_rate")
    return (f"toxicity {fmt_num(m['toxicity_mean'])} +- {fmt_num(m['toxicity_std'])}, "
            f"faithfulness {fmt_num(m.get('faithfulness_mean'))}"
            + (f" ({fmt_pct(faithful, 0)} faithful)" if faithful is not None else "")
            + f", reward {fmt_num(m['reward_mean'])}, ROUGE-L {fmt_num(m.get('rougeL'))}")


def summary_table(results: dict) -> str:
    """Before/after figures, and the paired improvement with its interval."""
    m = results["metrics"]
    rows = [(label, fmt_num(m["before"].get(key)), fmt_num(m["after"].get(key))) for key, label in SUMMARY_ROWS]
    c = m["comparison"]
    confidence = round(100 * c.get("confidence", 0.95))
    return "\n".join([
        text_table(("metric", "before", "after"), rows),
        f"mean toxicity improvement: {fmt_pct(c['mean_improvement'], 2)} ({confidence}% CI "
        f"{fmt_pct(c['mean_improvement_ci_low'], 2)} .. {fmt_pct(c['mean_improvement_ci_high'], 2)}), "
        f"std improvement: {fmt_pct(c['std_improvement'], 2)}"])
