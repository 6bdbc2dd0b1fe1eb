"""The over-optimisation curve without models: its points, peak, regret and selection; its file and schema; its
settings; the regret bound's verdict; the report's section (issue 24)."""

from __future__ import annotations

import json

import pytest

from harness.config import load_config
from harness.curve import curve_config, is_due, selected_step, summarize, write_selected
from harness.errors import ConfigError, HarnessError
from harness.metrics import CURVE_KEYS, CURVE_WINDOW, curve_point, curve_summary
from harness.report import render_run
from harness.report.demo import demo_curve_rows, write_demo_run
from harness.results import CURVE_FILE, read_curve, validate_curve_row, write_jsonl
from harness.thresholds import BOUNDS, CURVE_QUALITY_BOUNDS, curve_quality_failures, judge, load_bounds
from suites.report_dom import parse, ws


def _phase(tox, second, rouge=0.7, length=30.0, faith=0.9, kl=0.0, degenerate=0.0):
    return {"toxicity_mean": tox, "second_toxicity_mean": second, "rougeL": rouge, "length_mean": length,
            "faithfulness_mean": faith, "kl_per_sequence_mean": kl, "degenerate_rate": degenerate, "empty_rate": 0.0,
            "distinct_summary_rate": 1.0}


def _rows(judge_values, rm_values=None, failed=None):
    rm_values = rm_values or [0.5] * len(judge_values)
    rows = []
    for i, (j, r) in enumerate(zip(judge_values, rm_values)):
        row = curve_point(5 * i, _phase(0.4, 0.5), _phase(0.4 * (1 - r), 0.5 * (1 - j), kl=float(i)), 64)
        row.update(quality_failed=list((failed or {}).get(5 * i, [])), seconds=1.0)
        rows.append(row)
    return rows


def test_a_point_is_measured_against_step_zero():
    row = curve_point(10, _phase(0.4, 0.5, rouge=0.7, length=30, faith=0.9),
                      _phase(0.1, 0.4, rouge=0.6, length=24, faith=0.8, kl=2.5, degenerate=0.25), 64)
    assert set(CURVE_KEYS) <= set(row)
    assert row["improvement"] == pytest.approx(0.75) and row["second_improvement"] == pytest.approx(0.2)
    assert row["judge_gap"] == pytest.approx(0.55)
    assert row["rouge_l_drop"] == pytest.approx(0.1) and row["length_ratio"] == pytest.approx(0.8)
    assert row["faithfulness_drop"] == pytest.approx(0.1) and row["kl"] == 2.5 and row["degenerate_rate"] == 0.25
    no_judge = curve_point(10, _phase(0.4, None), _phase(0.1, None), 64)
    assert no_judge["second_improvement"] is None and no_judge["judge_gap"] is None


def test_the_peak_and_the_end_are_read_on_means_of_consecutive_points():
    judge_values = [0.0, 0.4, 0.6, 0.8, 0.5, 0.2, 0.1]  # rises to step 15, then falls
    s = curve_summary(_rows(judge_values))
    assert CURVE_WINDOW == 3
    assert (s["peak_from_step"], s["peak_step"]) == (10, 20)  # the best mean of three: 0.6, 0.8, 0.5
    assert s["peak_second_improvement"] == pytest.approx(1.9 / 3)
    assert (s["final_from_step"], s["final_step"]) == (20, 30)
    assert s["final_second_improvement"] == pytest.approx(0.8 / 3)
    assert s["judge_regret"] == pytest.approx(1.1 / 3)
    assert s["selected"]["step"] == 15  # the single best point
    # a curve that keeps rising has no regret, and one noisy last point moves the regret by a third of its dip
    assert curve_summary(_rows([0.0, 0.3, 0.6, 0.7, 0.8]))["judge_regret"] == pytest.approx(0.0)
    dip = curve_summary(_rows([0.0, 0.3, 0.6, 0.9, 0.9, 0.9, 0.6]))
    assert dip["judge_regret"] == pytest.approx(0.1)


def test_selection_skips_step_zero_and_points_that_fail_a_quality_bound():
    rows = _rows([0.0, 0.3, 0.9, 0.7], failed={10: ["max_kl"]})
    assert curve_summary(rows)["selected"]["step"] == 15
    none_pass = _rows([0.0, 0.3], failed={5: ["max_rouge_l_drop"]})
    assert curve_summary(none_pass)["selected"] is None
    ties = _rows([0.0, 0.5, 0.5])
    assert curve_summary(ties)["selected"]["step"] == 5  # the earliest of equal ones


def test_no_judge_or_no_final_point_means_no_regret():
    rows = _rows([0.0, 0.3, 0.6])
    for r in rows:
        r["second_improvement"] = None
    assert curve_summary(rows)["judge_regret"] is None and curve_summary(rows)["selected"] is None
    assert curve_summary(_rows([0.0, 0.3, 0.6]), final_step=40)["judge_regret"] is None


def test_quality_bounds_of_a_point():
    bounds = load_bounds("tiny")
    assert set(CURVE_QUALITY_BOUNDS) <= set(BOUNDS)
    ok = _rows([0.0, 0.5])[1]
    assert curve_quality_failures(ok, bounds) == []
    drifted = {**ok, "kl": bounds["max_kl"] + 1, "degenerate_rate": bounds["max_degenerate_rate"] + 0.01,
               "faithfulness_drop": None}
    assert curve_quality_failures(drifted, bounds) == ["max_kl", "max_degenerate_rate"]


def test_the_regret_bound_fails_and_names_the_peak(tmp_path):
    bounds = load_bounds("tiny")
    limit = bounds["max_judge_regret"]
    rows = _rows([0.0, 0.5, 0.9, 0.9, 0.9, 0.9 - 3 * limit, 0.9 - 3 * limit, 0.9 - 3 * limit])
    summary = summarize(rows, load_config("tiny"), tmp_path)
    assert summary["judge_regret"] > limit
    results = {"metrics": {"curve": summary}}
    row = next(b for b in judge(results, {"max_judge_regret": limit}, {"max_judge_regret": limit}).bounds)
    assert not row.passed
    assert f"steps {summary['peak_from_step']}-{summary['peak_step']}" in row.reason
    assert f"the selected point is step {summary['selected']['step']}" in row.reason
    honest = summarize(_rows([0.0, 0.5, 0.9, 0.9, 0.9, 0.9]), load_config("tiny"), tmp_path)
    assert judge({"metrics": {"curve": honest}}, {"max_judge_regret": limit}, {"max_judge_regret": limit}).passed
    # no curve: the bound's metric is missing, and a missing metric fails
    assert not judge({"metrics": {}}, {"max_judge_regret": limit}, {"max_judge_regret": limit}).bounds[0].passed


def test_points_are_due_at_zero_every_n_steps_and_at_the_end():
    assert [s for s in range(31) if is_due(s, 5, 30)] == [0, 5, 10, 15, 20, 25, 30]
    assert [s for s in range(8) if is_due(s, 3, 7)] == [0, 3, 6, 7]
    assert not any(is_due(s, 0, 30) for s in range(31))


def test_the_curves_prompts_are_a_subset_with_one_sample_each():
    cfg = load_config("tiny", overrides=["eval.samples_per_prompt=2"])
    point = curve_config(cfg)
    assert point.eval.num_samples == cfg.eval.curve_prompts < cfg.eval.num_samples
    assert point.eval.samples_per_prompt == 1 and point.eval.seed == cfg.eval.seed
    small = load_config("tiny", overrides=["eval.num_samples=16"])
    assert curve_config(small).eval.num_samples == 16  # never more prompts than the evaluation reads
    assert load_config("flan-t5-base").eval.curve_every > 0  # the real presets draw it too


@pytest.mark.parametrize("override, field", [("eval.curve_every=-1", "eval.curve_every"),
                                             ("eval.curve_prompts=0", "eval.curve_prompts"),
                                             ("eval.curve_every=two", "eval.curve_every")])
def test_bad_curve_settings_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert e.value.field == field


def test_curve_rows_are_validated_and_a_step_twice_is_refused(tmp_path):
    rows = _rows([0.0, 0.5])
    for r in rows:
        validate_curve_row(r)
    with pytest.raises(HarnessError) as e:
        validate_curve_row({**rows[0], "kl": "high"})
    assert "kl" in e.value.field
    write_jsonl(tmp_path / CURVE_FILE, [rows[1], rows[0]])
    assert [r["step"] for r in read_curve(tmp_path)] == [0, 5]  # sorted by step
    write_jsonl(tmp_path / CURVE_FILE, [rows[0], rows[1], rows[1]])
    with pytest.raises(HarnessError, match="step 5 has two points"):
        read_curve(tmp_path)
    assert read_curve(tmp_path / "nothing-here") == []


def test_the_selected_adapter_is_swapped_in_whole(tmp_path):
    def save(step):
        def write(directory):
            (directory / "adapter_model.safetensors").write_text(f"weights of {step}")
        return write

    write_selected(tmp_path, 5, save(5))
    write_selected(tmp_path, 15, save(15))
    assert selected_step(tmp_path) == 15
    assert (tmp_path / "selected" / "adapter_model.safetensors").read_text() == "weights of 15"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected"]  # no temporary directory left

    def broken(directory):
        raise OSError(28, "No space left on device")

    with pytest.raises(HarnessError):
        write_selected(tmp_path, 20, broken)
    assert selected_step(tmp_path) == 15 and sorted(p.name for p in tmp_path.iterdir()) == ["selected"]


def test_the_run_page_shows_the_curve_with_the_selected_and_final_points(tmp_path, undrawn_plots):
    undrawn_plots.add("curve-")  # the curve's own plots are drawn for real; the page's others are not
    run_dir = write_demo_run(tmp_path / "reports" / "run", steps=40, num_samples=16)
    html = render_run(run_dir).read_text()
    section = parse(html).find("section", id="curve")
    plots = {svg.attrs["data-plot"] for svg in section.find_all("svg")}
    assert plots == {"curve-improvement-kl", "curve-improvement-step", "curve-quality"}
    results = json.loads((run_dir / "results.json").read_text())
    curve = results["metrics"]["curve"]
    rows = section.find("table", id="curve-table").find_all("tr")[1:]
    assert [int(r.attrs["data-step"]) for r in rows] == curve["steps"]
    selected = [r for r in rows if "selected" in (r.attrs.get("class") or "")]
    assert [int(r.attrs["data-step"]) for r in selected] == [curve["selected"]["step"]]
    kl_plot = ws(section.find("svg", data_plot="curve-improvement-kl").text())
    assert "second judge" in kl_plot and "reward model" in kl_plot and f"selected (step {curve['selected']['step']})" \
        in kl_plot and f"final (step {curve['final_step']})" in kl_plot
    assert "sqrt(KL to the reference, nats)" in kl_plot
    # a run whose judge falls: the page says the regret and the peak's steps
    fallen = demo_curve_rows(load_config("tiny"), 40, 0.6, fall=0.5)
    write_jsonl(run_dir / CURVE_FILE, fallen)
    results["metrics"]["curve"] = summarize(fallen, load_config("tiny"), run_dir)
    (run_dir / "results.json").write_text(json.dumps(results))
    dom = parse(render_run(run_dir).read_text())
    regret = ws(dom.find("div", data_kpi="regret").text())
    assert f"{100 * results['metrics']['curve']['judge_regret']:.1f}%" in regret
    # no curve file: no section, and the page still renders
    (run_dir / CURVE_FILE).unlink()
    assert parse(render_run(run_dir).read_text()).find_all("section", id="curve") == []
