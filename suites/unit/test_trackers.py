"""Tracker export (output.report_to): what every tracker gets, a missing extra refused before a run, and the records
read back with TensorBoard's own reader (skipped where the extra is not installed)."""

from __future__ import annotations

import importlib.util

import pytest

from harness.errors import EXIT_BAD_INPUT, HarnessError
from harness.trackers import records, require_trackers, to_tensorboard

RESULTS = {
    "run_id": "r1", "preset": "tiny", "config": {"ppo": {"steps": 2}},
    "metrics": {"before": {"toxicity_mean": 0.4, "rougeL": None}, "after": {"toxicity_mean": 0.1},
                "comparison": {"mean_improvement": 0.75}, "training": {"steps": 2}},
    "verdict": {"passed": False, "status": "FAIL", "reasons": ["min_improvement failed"],
                "bounds": [{"name": "min_improvement", "bound": 0.76, "op": ">=", "value": 0.75, "passed": False,
                            "description": "mean toxicity improvement"},
                           {"name": "max_kl", "bound": 15.0, "op": "<=", "value": None, "passed": False,
                            "description": "KL"}]},
}
STATS = [{"step": 1, "objective": {"kl": 0.0}, "ppo": {"loss": {"total": 0.5}}, "note": "text"},
         {"step": 2, "objective": {"kl": 0.25}, "ppo": {"loss": {"total": float("nan")}}}]


def test_records_hold_each_steps_statistics_the_metrics_and_every_bound():
    rec = records(RESULTS, STATS)
    assert rec["steps"] == [(1, {"ppo/objective.kl": 0.0, "ppo/ppo.loss.total": 0.5}), (2, {"ppo/objective.kl": 0.25})]
    s = rec["scalars"]
    assert s["before/toxicity_mean"] == 0.4 and "before/rougeL" not in s  # not measured: not logged as a number
    assert s["comparison/mean_improvement"] == 0.75 and s["verdict/passed"] == 0.0
    assert s["bound/min_improvement/limit"] == 0.76 and s["bound/min_improvement/measured"] == 0.75
    assert s["bound/min_improvement/passed"] == 0.0 and "bound/max_kl/measured" not in s


def test_a_tracker_that_is_not_installed_is_bad_input_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(HarnessError) as e:
        require_trackers(["mlflow"])
    assert e.value.exit_code == EXIT_BAD_INPUT and "detox-harness[mlflow]" in str(e.value)


def test_tensorboards_reader_returns_the_exported_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = tmp_path / "index.html"
    report.write_text("<html>report</html>")
    log_dir = to_tensorboard(tmp_path, RESULTS, STATS, report)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("ppo/objective.kl")] == [(1, 0.0), (2, 0.25)]
    assert acc.Scalars("bound/min_improvement/measured")[0].value == pytest.approx(0.75)
    assert acc.Scalars("verdict/passed")[0].value == 0.0
    text = acc.Tensors("verdict/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "verdict: FAIL" in text and "min_improvement" in text and "0.75" in text
    assert (log_dir / "index.html").read_text() == "<html>report</html>"
