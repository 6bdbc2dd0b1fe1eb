"""The HTML report (harness.report): content, ordering, escaping, graceful gaps, errors.

Run folders are synthetic but built by the harness's own code: harness.report.demo.write_demo_run
draws evaluation rows from a seeded RNG and writes them through harness.metrics.phase_metrics,
harness.results.build_results / write_run_files (schema-valid results.json) and harness.thresholds.verdict,
with train_stats.jsonl rows shaped like the PPO trainer's (``skipped`` is the float 1.0 / 0.0). A test
that needs a broken or unusual file edits a valid one, one key at a time. The pages are parsed with the
standard library's HTMLParser into a small tree so that the assertions are about elements (which row is
inside which <details>), not substrings.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

import harness.ppo
from harness.errors import HarnessError
from harness.report import load_results, render_index, render_run
from harness.report.demo import demo_config, train_stats_rows, write_demo_run
from harness.report.render import (
    REWARD_NOISE,
    flatten_config,
    fmt_diff,
    fmt_duration,
    fmt_num,
    fmt_pct,
    fmt_signed,
    fmt_value,
)
from harness.results import TRAIN_STATS_FILE, read_jsonl
from harness.thresholds import SFT_BOUNDS, load_bounds
from suites.report_dom import Node, cells, parse, rewrite_results, ws

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
PAYLOAD = SCRIPT + IMG


# --------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One rendered demo run with the payload planted in summaries, a prompt and the config."""
    run_dir = write_demo_run(tmp_path_factory.mktemp("reports") / "run-demo", toxic_text=PAYLOAD,
                             skipped_steps=(7,))
    page = render_run(run_dir)
    html = page.read_text()
    results = json.loads((run_dir / "results.json").read_text())
    return {"dir": run_dir, "page": page, "html": html, "dom": parse(html), "results": results}


# --------------------------------------------------------------------------------------------
# the page as a file

def test_render_run_writes_one_self_contained_page(demo):
    run_dir, page, html = demo["dir"], demo["page"], demo["html"]
    assert page == run_dir / "index.html"
    assert html.startswith("<!DOCTYPE html>")
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []  # atomic write left no temp
    assert len(html.encode()) < 1_000_000, "a typical page must stay well under 1 MB"
    dom = demo["dom"]
    # nothing to fetch: no scripts, stylesheets, images, frames, fonts or remote URLs
    for tag in ("script", "link", "img", "iframe", "object", "embed"):
        assert dom.find_all(tag) == [], tag
    assert "@import" not in html and "@font-face" not in html and "url(http" not in html
    hrefs = [n.attrs.get("href") or n.attrs.get("xlink:href") for n in dom.iter()
             if "href" in n.attrs or "xlink:href" in n.attrs]
    assert hrefs and all(h.startswith("#") or h == "../index.html" for h in hrefs), hrefs
    ids = [n.attrs["id"] for n in dom.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "duplicate element ids (several inline SVGs on one page)"
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html


def test_sections_in_the_required_order(demo):
    html = demo["html"]
    order = [html.index(f'<section class="card" id="{s}"') for s in
             ("verdict", "toxicity", "quality", "training", "samples", "provenance")]
    assert order == sorted(order)


# --------------------------------------------------------------------------------------------
# verdict

def test_verdict_rows_show_bound_value_and_result(demo):
    dom, results = demo["dom"], demo["results"]
    bounds = results["verdict"]["bounds"]
    assert len(bounds) == len([n for n in load_bounds("tiny") if n not in SFT_BOUNDS])  # no warm start here
    section = dom.find("section", id="verdict")
    for b in bounds:
        row = section.find("tr", data_bound=b["name"])
        cells = [ws(td.text()) for td in row.find_all("td")]
        assert cells[0] == b["name"]
        assert cells[2] == f'{b["op"]} {fmt_num(b["bound"])}'
        assert cells[3] == fmt_num(b["value"])
        assert cells[4] == ("PASS" if b["passed"] else "FAIL")
        tds = row.find_all("td")
        assert "num" in tds[2].classes() and "num" in tds[3].classes()  # right-aligned numbers
    overall = ws(dom.find(id="overall").text())
    assert overall == ("PASS" if results["verdict"]["passed"] else "FAIL")


def test_failed_bound_and_missing_value_make_the_page_fail(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", training=False)

    def fail_one(r):
        r["verdict"]["passed"] = False
        b = r["verdict"]["bounds"][2]
        b.update(value=None, passed=False)

    results = rewrite_results(run_dir, fail_one)
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find(id="overall").text()) == "FAIL"
    assert "FAIL" in dom.find("title").text()
    name = results["verdict"]["bounds"][2]["name"]
    row = dom.find("tr", data_bound=name)
    assert "fail" in row.classes()
    assert [ws(td.text()) for td in row.find_all("td")][3:] == ["missing", "FAIL"]
    held = sum(b["passed"] for b in results["verdict"]["bounds"])
    assert f"{held} of {len(results['verdict']['bounds'])} bounds hold" in ws(dom.find("section", id="verdict").text())
    badge = dom.find(id="overall").find("span")
    assert {"badge", "fail"} <= badge.classes()


def test_overall_result_comes_from_the_file_not_only_the_bounds(tmp_path, undrawn_plots):
    # the run may fail for a reason beyond the listed bounds: the file's "passed" is authoritative
    run_dir = write_demo_run(tmp_path / "run", training=False, num_samples=8)

    def fail_overall(r):
        for b in r["verdict"]["bounds"]:
            b["passed"] = True
        r["verdict"]["passed"] = False

    rewrite_results(run_dir, fail_overall)
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find(id="overall").text()) == "FAIL"
    rewrite_results(run_dir, lambda r: r["verdict"].update(passed=True))  # the same bounds: the file decides
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find(id="overall").text()) == "PASS"
    # a verdict without "passed" is refused (the schema requires it), not judged from the bounds
    rewrite_results(run_dir, lambda r: r["verdict"].pop("passed"))
    with pytest.raises(HarnessError, match=r"results\.json: verdict\.passed: is missing"):
        render_run(run_dir)


# --------------------------------------------------------------------------------------------
# toxicity, quality, training

def test_toxicity_histogram_is_drawn_from_the_samples(demo):
    dom = demo["dom"]
    samples = [json.loads(line) for line in (demo["dir"] / "samples.jsonl").read_text().splitlines()]
    svg = dom.find("svg", data_plot="toxicity-histogram")
    text = ws(svg.text())
    for phase in ("before", "after"):
        mean = sum(s[f"toxicity_{phase}"] for s in samples) / len(samples)
        assert f"{phase} (n={len(samples)}, mean {mean:.3f})" in text
    assert "toxicity of a summary" in text and "number of summaries" in text  # labelled axes
    assert "viewBox" in svg.attrs or "viewbox" in svg.attrs
    means = dom.find("svg", data_plot="toxicity-means")
    assert "mean toxicity" in ws(means.text())


def test_means_intervals_and_improvement_figures(demo):
    dom, m = demo["dom"], demo["results"]["metrics"]
    section = ws(dom.find("section", id="toxicity").text())
    b, a, c = m["before"], m["after"], m["comparison"]
    assert f'{fmt_num(b["toxicity_mean"])} → {fmt_num(a["toxicity_mean"])}' in section
    assert f'[{fmt_num(b["toxicity_ci_low"])}, {fmt_num(b["toxicity_ci_high"])}]' in section
    assert f'[{fmt_num(a["toxicity_ci_low"])}, {fmt_num(a["toxicity_ci_high"])}]' in section
    row = cells(dom.find("tr", data_metric="mean_improvement_ci"))
    assert row[:2] == ["95% interval",
                       f'[{fmt_pct(c["mean_improvement_ci_low"])}, {fmt_pct(c["mean_improvement_ci_high"])}]']
    assert cells(dom.find("tr", data_metric="mean_improvement"))[1] == fmt_pct(c["mean_improvement"])
    assert cells(dom.find("tr", data_metric="reward_gain"))[1] == fmt_signed(c["reward_gain"])


def test_quality_guards_table(demo):
    dom, m = demo["dom"], demo["results"]["metrics"]
    table = dom.find("table", id="quality-table")
    keys = [tr.attrs["data-metric"] for tr in table.find_all("tr") if "data-metric" in tr.attrs]
    assert keys == ["rouge1", "rouge2", "rougeL", "empty_rate", "length_mean", "distinct_1", "distinct_2",
                    "repeated_ngram_rate", "kl_per_token_mean", "kl_per_sequence_mean", "second_toxicity_mean",
                    "response_toxicity_mean", "degenerate_rate", "copy_rate", "faithfulness_mean", "faithful_rate",
                    "distinct_summary_rate"]
    rouge = [ws(td.text()) for td in table.find("tr", data_metric="rougeL").find_all("td")]
    assert rouge[1:4] == [fmt_num(m["before"]["rougeL"]), fmt_num(m["after"]["rougeL"]),
                          fmt_signed(m["after"]["rougeL"] - m["before"]["rougeL"])]
    assert "max_rouge_l_drop" in rouge[4]
    # the demo's second judge is measured: its means and change render as right-aligned numbers
    second = table.find("tr", data_metric="second_toxicity_mean").find_all("td")
    b, a = m["before"]["second_toxicity_mean"], m["after"]["second_toxicity_mean"]
    assert [ws(td.text()) for td in second[1:4]] == [fmt_num(b), fmt_num(a), fmt_signed(a - b)]
    assert all("num" in td.classes() for td in second[1:4])


def test_training_curves_per_ppo_step(demo):
    dom = demo["dom"]
    section = dom.find("section", id="training")
    plotted = {svg.attrs["data-plot"] for svg in section.find_all("svg")}
    assert plotted == {"train-objective-kl", "train-objective-kl-coef", "train-env-reward-mean",
                       "train-ppo-returns-mean", "train-ppo-loss-policy", "train-ppo-loss-value",
                       "train-ppo-policy-clipfrac", "train-objective-entropy", "train-tokens-responses-len-mean"}
    kl = ws(section.find("svg", data_plot="train-objective-kl").text())
    assert "PPO step" in kl and "KL(policy || ref), nats" in kl
    assert "skipped step" in kl  # the demo's step 7 was skipped: its red line has a legend entry
    text = ws(section.text())
    assert "40 recorded, 1 skipped (non-finite)" in text
    training = demo["results"]["metrics"]["training"]
    assert fmt_num(training["objective_kl_mean"]) in text


def _training_svgs(dom: Node) -> dict[str, str]:
    section = dom.find("section", id="training")
    return {svg.attrs["data-plot"]: ws(svg.text()) for svg in section.find_all("svg")}


def test_a_step_the_trainer_skipped_is_counted_and_marked(tmp_path, undrawn_plots):
    # the trainer writes "skipped": 1.0 and "skip_reason" for a step whose update it undid (harness/ppo/step.py),
    # never JSON true: the page must count that step and mark it on every curve
    run_dir = write_demo_run(tmp_path / "run", steps=12, skipped_steps=(5,))
    rows = read_jsonl(run_dir / TRAIN_STATS_FILE)
    assert [r["skipped"] for r in rows] == [0.0] * 4 + [1.0] + [0.0] * 7
    assert all(type(r["skipped"]) is float for r in rows)
    assert rows[4]["step"] == 5 and rows[4]["skip_reason"] == "non-finite loss" and "objective/kl" not in rows[4]
    assert load_results(run_dir)["metrics"]["training"]["skipped_steps"] == 1
    dom = parse(render_run(run_dir).read_text())
    text = ws(dom.find("section", id="training").text())
    assert "12 recorded, 1 skipped (non-finite)" in text
    assert "red lines mark skipped steps" in text
    svgs = _training_svgs(dom)
    assert len(svgs) == 9 and all("skipped step" in t for t in svgs.values()), svgs.keys()
    # without a skipped step, nothing is marked
    clean = parse(render_run(write_demo_run(tmp_path / "clean", steps=12)).read_text())
    assert "skipped" not in ws(clean.find("section", id="training").text())
    assert not any("skipped step" in t for t in _training_svgs(clean).values())


def test_demo_train_stats_rows_use_the_trainers_names():
    # every statistic the demo writes is one the PPO step or the trainer writes (TRL 0.11 names)
    ppo = Path(harness.ppo.__file__).parent
    literals = set(re.findall(r'"([A-Za-z_/]+)"', (ppo / "step.py").read_text() + (ppo / "trainer.py").read_text()))
    rows = train_stats_rows(demo_config(steps=3), 3, skipped_steps=(2,))
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
    for row in rows:
        unknown = [k for k in row if k not in literals and not (k.startswith("ppo/") and k[4:] in literals)]
        assert unknown == []
    assert set(rows[1]) < set(rows[0]) | {"skip_reason"}


# --------------------------------------------------------------------------------------------
# qualitative table

def _ranked_rows(dom: Node):
    section = dom.find("section", id="samples")
    return [(tr, float(tr.attrs["data-reward-diff"]), int(tr.attrs["data-rank"]))
            for tr in section.find_all("tr") if "data-rank" in tr.attrs]


def _expected_split(diffs: list[float], visible: int = 5) -> tuple[list[int], list[int], list[int]]:
    """Ranks (1-based) of the visible gains, the visible losses and the rest, from the diffs themselves."""
    gains = [i + 1 for i, d in enumerate(diffs) if d >= REWARD_NOISE][:visible]
    losses = [i + 1 for i, d in enumerate(diffs) if d <= -REWARD_NOISE][-visible:]
    rest = [r for r in range(1, len(diffs) + 1) if r not in gains and r not in losses]
    return gains, losses, rest


def test_qualitative_best_and_worst_first_rest_in_details(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", training=False, seed=3)
    # build_results writes the rows sorted by reward_diff, descending (the schema's rule)
    diffs = [q["reward_diff"] for q in load_results(run_dir)["qualitative"]]
    assert len(diffs) == 20 and diffs == sorted(diffs, reverse=True)
    gains, losses, rest = _expected_split(diffs)
    assert len(gains) == 5 and 0 < len(losses) < 5  # the demo's seed 3 has fewer real losses than rows shown
    dom = parse(render_run(run_dir).read_text())
    rows = _ranked_rows(dom)
    in_details = [any(a.tag == "details" for a in tr.ancestors()) for tr, _, _ in rows]
    ranks = [rank for _, _, rank in rows]
    # document order: best 5, the real losses (both visible), then the rest behind <details>
    assert ranks == gains + losses + rest
    assert in_details == [False] * (len(gains) + len(losses)) + [True] * len(rest)
    by_rank = {rank: d for _, d, rank in rows}
    assert [by_rank[r] for r in range(1, 21)] == pytest.approx(diffs)
    # the displayed Δ reward is the first numeric cell of each row
    top = rows[0][0].find_all("td")
    assert ws(top[1].text()) == fmt_signed(diffs[0])
    section = dom.find("section", id="samples")
    assert ws(section.find("h3", id="worst-heading").text()) == f"Worst {len(losses)}"
    details = dom.find("details", id="more-samples")
    assert f"The other {len(rest)} rows (ranks {rest[0]}–{rest[-1]})" in ws(details.find("summary").text())


def test_worst_rows_are_real_losses_and_noise_is_no_change(tmp_path, undrawn_plots):
    # float noise of two scorings of the same summary (+2.384e-07, some positive) is no change: it is never
    # listed as a loss, and no Δ reward is written in scientific notation
    run_dir = write_demo_run(tmp_path / "run", training=False, seed=3)
    noise = [2.384e-07, 1.0e-07, -3.1e-07]

    def add_noise(r):
        rows = r["qualitative"]
        losses = [i for i, q in enumerate(rows) if q["reward_diff"] < 0]
        for q, d in zip(rows[losses[0] - len(noise):losses[0]], noise):  # just above the real losses: still sorted
            q["reward_after"] = q["reward_before"] + d
            q["reward_diff"] = d

    results = rewrite_results(run_dir, add_noise)
    diffs = [q["reward_diff"] for q in results["qualitative"]]
    assert sum(abs(d) < REWARD_NOISE for d in diffs) == len(noise)
    gains, losses, rest = _expected_split(diffs)
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find("h3", id="worst-heading").text()) == f"Worst {len(losses)}"
    table = dom.find("table", id="worst-table")
    shown = [(int(tr.attrs["data-rank"]), float(tr.attrs["data-reward-diff"]))
             for tr in table.find_all("tr") if "data-rank" in tr.attrs]
    assert [rank for rank, _ in shown] == losses
    assert shown and all(d <= -REWARD_NOISE for _, d in shown)
    assert "Largest reward losses" in ws(table.text())
    rows = {rank: tr for tr, _, rank in _ranked_rows(dom)}
    for rank, d in enumerate(diffs, 1):
        text = ws(rows[rank].find_all("td")[1].text())
        assert text == ("0" if abs(d) < REWARD_NOISE else fmt_signed(d)), (rank, d, text)
        assert not re.search(r"\de[-+]?\d", text), text


def test_faithfulness_stands_beside_toxicity_in_the_headline_and_the_guards(demo):
    dom, m = demo["dom"], demo["results"]["metrics"]
    kpis = [k.attrs.get("id") for k in dom.find("section", id="toxicity").find_all("div") if "kpi" in k.classes()]
    assert kpis.index("kpi-faithfulness") == 1  # right after mean toxicity
    kpi = ws(dom.find("div", id="kpi-faithfulness").text())
    assert f"{fmt_num(m['before']['faithfulness_mean'])} → {fmt_num(m['after']['faithfulness_mean'])}" in kpi
    assert f"{fmt_pct(m['before']['faithful_rate'])} → {fmt_pct(m['after']['faithful_rate'])}" in kpi
    assert fmt_num(m["comparison"]["faithfulness_drop_ci_high"]) in kpi
    quality = dom.find("table", id="quality-table")
    row = cells(quality.find("tr", data_metric="faithfulness_mean"))
    assert row[1:3] == [fmt_num(m["before"]["faithfulness_mean"]), fmt_num(m["after"]["faithfulness_mean"])]
    assert cells(quality.find("tr", data_metric="distinct_summary_rate"))[2] == fmt_pct(
        m["after"]["distinct_summary_rate"])


def _faithfulness_cells(tr) -> tuple[str, str]:
    tds = tr.find_all("td")
    return ws(tds[4].text()), ws(tds[5].text())  # after #, Δ reward, reward before, reward after


def test_unfaithful_summaries_are_marked_in_the_samples_table(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", training=False, seed=3)
    threshold = load_results(run_dir)["config"]["eval"]["faithful_threshold"]

    def plant(r):  # rank 1: unfaithful after; rank 2: unfaithful before only; rank 3: at the threshold (faithful)
        q = r["qualitative"]
        q[0].update(faithfulness_before=min(1.0, threshold + 0.3), faithfulness_after=threshold / 2)
        q[1].update(faithfulness_before=threshold / 3, faithfulness_after=min(1.0, threshold + 0.2))
        q[2].update(faithfulness_before=threshold, faithfulness_after=threshold)

    results = rewrite_results(run_dir, plant)
    dom = parse(render_run(run_dir).read_text())
    table = dom.find("table", id="best-table")
    heads = [ws(th.text()) for th in table.find_all("th")]
    assert heads[4:6] == ["faithfulness before", "faithfulness after"]
    rows = {rank: tr for tr, _, rank in _ranked_rows(dom)}
    q = results["qualitative"]
    assert "unfaithful" in rows[1].classes() and rows[1].attrs["data-unfaithful"] == "after"
    before, after = _faithfulness_cells(rows[1])
    assert before == fmt_num(q[0]["faithfulness_before"]) and after == f"{fmt_num(threshold / 2)} ✗ unfaithful"
    assert "unfaithful" in rows[1].find_all("td")[5].classes()
    assert "unfaithful" in rows[2].classes() and rows[2].attrs["data-unfaithful"] == "before"
    assert _faithfulness_cells(rows[2])[0].endswith("✗ unfaithful")
    assert "unfaithful" not in rows[3].classes() and "✗" not in " ".join(_faithfulness_cells(rows[3]))
    marked = {rank for rank, tr in rows.items() if "unfaithful" in tr.classes()}
    expected = {i + 1 for i, r in enumerate(q) if min(r["faithfulness_before"], r["faithfulness_after"]) < threshold}
    assert marked == expected
    assert f"eval.faithful_threshold = {threshold:g}" in ws(dom.find("section", id="samples").text())


def test_a_run_without_faithfulness_figures_renders_without_its_columns(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", training=False, seed=3)

    def older(r):  # as a results.json written before the faithfulness judge
        for q in r["qualitative"]:
            del q["faithfulness_before"], q["faithfulness_after"]
        for phase in ("before", "after"):
            for key in ("faithfulness_mean", "faithful_rate", "distinct_summary_rate"):
                del r["metrics"][phase][key]
        for key in ("faithfulness_change", "faithfulness_drop_ci_high", "faithful_rate_change"):
            del r["metrics"]["comparison"][key]

    rewrite_results(run_dir, older)
    dom = parse(render_run(run_dir).read_text())
    assert "faithfulness before" not in ws(dom.find("table", id="best-table").text())
    assert dom.find_all("tr", **{"class": "unfaithful"}) == []
    assert "no faithfulness judge" in ws(dom.find("div", id="kpi-faithfulness").text())
    assert cells(dom.find("tr", data_metric="faithfulness_mean"))[1] == "not measured"


def test_qualitative_rows_out_of_order_are_refused(tmp_path, undrawn_plots):
    # the file's order is the ranking: a results.json whose rows are not sorted is refused, not re-sorted
    run_dir = write_demo_run(tmp_path / "run", training=False, seed=3)
    rewrite_results(run_dir, lambda r: r["qualitative"].reverse())
    (run_dir / "index.html").write_text("old page")
    with pytest.raises(HarnessError) as info:
        render_run(run_dir)
    message = str(info.value)
    assert str(run_dir / "results.json") in message and "qualitative: rows must be sorted by reward_diff" in message
    assert (run_dir / "index.html").read_text() == "old page"


def test_short_qualitative_list_has_no_disclosure(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", training=False, num_samples=8, qualitative_rows=6)
    dom = parse(render_run(run_dir).read_text())
    assert [rank for _, _, rank in _ranked_rows(dom)] == [1, 2, 3, 4, 5, 6]
    assert dom.find_all("details", id="more-samples") == []


# --------------------------------------------------------------------------------------------
# provenance

def test_provenance_values(demo):
    dom, results = demo["dom"], demo["results"]
    section = dom.find("section", id="provenance")
    env = results["environment"]
    assert ws(dom.find(id="git-commit").text()) == env["git_commit"]
    for name, version in env["versions"].items():
        assert any([ws(td.text()) for td in tr.find_all("td")] == [name, fmt_value(version)]
                   for tr in section.find("table", id="versions").find_all("tr"))
    seeds = {ws(tr.find_all("td")[0].text()): ws(tr.find_all("td")[1].text())
             for tr in section.find("table", id="seeds").find_all("tr")}
    assert seeds == {k: str(v) for k, v in results["seeds"].items()}
    timings = {ws(tr.find_all("td")[0].text()): ws(tr.find_all("td")[1].text())
               for tr in section.find("table", id="timings").find_all("tr")}
    assert timings == {"eval_before_s": "12.5 s", "train_s": "2 min 31 s", "eval_after_s": "13.0 s",
                       "total_s": "2 min 57 s"}
    dl = section.find("dl")
    facts = dict(zip([ws(n.text()) for n in dl.find_all("dt")], [ws(n.text()) for n in dl.find_all("dd")]))
    assert facts["device"] == env["device"] and facts["platform"] == env["platform"]
    assert facts["run id"] == results["run_id"] and facts["created"] == results["created"]
    assert facts["preset"] == "tiny" and facts["file: train_stats"] == "train_stats.jsonl"
    config = {ws(tr.find_all("td")[0].text()): tr.find_all("td")[1].text()
              for tr in section.find("details", id="config").find_all("tr") if tr.find_all("td")}
    assert config["ppo.steps"] == "40"  # the tiny preset's configuration, sized like the demo run
    assert config["eval.num_samples"] == "48"
    assert config["policy.lora_target_modules"] == '["q", "k", "v", "o", "wi", "wo"]'
    assert config["eval.second_classifier"] == "tiny://judge"  # the tiny preset's independent judge
    assert config["thresholds.max_kl"] == str(load_bounds("tiny")["max_kl"])


def test_the_pinned_revisions_and_prompts_fingerprint_are_shown(tmp_path, undrawn_plots):
    """results.json's provenance (issue 25): one row per model with its revision, the prompts' fingerprint; an
    evaluation (no before_cache) and a run written before provenance existed render too."""
    run_dir = write_demo_run(tmp_path / "run-pinned")
    revision = "sha256:" + "ab" * 32
    rewrite_results(run_dir, lambda r: r.update(provenance={
        "models": {"policy": {"location": "tiny://policy", "kind": "directory", "revision": revision},
                   "adapter": None,
                   "reward_model": {"location": "org/judge", "kind": "hub", "revision": None}},
        "data": {"fingerprint": "cd" * 32, "train_rows": 10, "test_rows": 4}}))
    table = parse(render_run(run_dir).read_text()).find("table", id="pinned")
    rows = [[ws(td.text()) for td in tr.find_all("td")] for tr in table.find_all("tr") if tr.find_all("td")]
    assert rows == [["policy", "tiny://policy", revision],
                    ["reward model", "org/judge", "unresolved (not in the local cache)"],
                    ["prompts", "10 train / 4 test rows", "sha256:" + "cd" * 32]]
    rewrite_results(run_dir, lambda r: r["provenance"].update(before_cache={"before": "hit"}))
    assert "reused from the cache" in render_run(run_dir).read_text()
    rewrite_results(run_dir, lambda r: r.pop("provenance"))
    assert "a run written before revisions were pinned" in render_run(run_dir).read_text()


# --------------------------------------------------------------------------------------------
# escaping

def _assert_inert(dom: Node, html: str):
    assert SCRIPT not in html and IMG not in html
    assert "<script" not in html.lower() and "<img" not in html.lower()
    for n in dom.iter():
        assert n.tag not in ("script", "img"), n.tag
        bad = [k for k in n.attrs if k.startswith("on")]
        assert not bad, (n.tag, bad)
        assert not any((v or "").strip().lower().startswith("javascript:") for v in n.attrs.values())


def test_model_output_and_config_strings_are_escaped(demo):
    dom, html = demo["dom"], demo["html"]
    _assert_inert(dom, html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    # shown as text where it belongs: the best row's summary after, the worst row's summary before ...
    rows = _ranked_rows(dom)
    best = rows[0][0].find_all("td")
    worst = max(rows, key=lambda r: r[2])[0].find_all("td")  # the last rank: the largest loss
    # (columns: #, Δ reward, reward before / after, faithfulness before / after, prompt, summary before / after)
    assert PAYLOAD in best[8].text() and PAYLOAD in best[6].text()
    assert worst[7].text().strip() == PAYLOAD
    # ... and in the config table
    config = {ws(tr.find_all("td")[0].text()): tr.find_all("td")[1].text()
              for tr in dom.find("details", id="config").find_all("tr") if tr.find_all("td")}
    assert config["data.prompt_template"] == PAYLOAD + " {dialogue}"
    assert config["policy.adapter"] == PAYLOAD


def test_run_id_preset_and_bound_names_are_escaped_on_both_pages(tmp_path, undrawn_plots):
    reports = tmp_path / "reports"
    run_dir = write_demo_run(reports / "x", training=False, run_id=PAYLOAD)

    def poison(r):
        r["preset"] = PAYLOAD
        r["environment"]["device"] = PAYLOAD
        r["verdict"]["bounds"][0]["description"] = PAYLOAD
        r["timings"][PAYLOAD] = 1.0

    rewrite_results(run_dir, poison)
    for page in (render_run(run_dir), render_index(reports)):
        html = page.read_text()
        dom = parse(html)
        _assert_inert(dom, html)
        assert PAYLOAD in dom.text()  # visible as text


# --------------------------------------------------------------------------------------------
# graceful gaps

def test_missing_optional_parts_render_as_not_measured(tmp_path, undrawn_plots):
    # what a valid results.json may leave out or leave null: the verdict (not judged), metrics.training (an
    # evaluation-only run), the qualitative rows (eval.qualitative_rows = 0), a second classifier's figures,
    # ROUGE, an undefined improvement (before toxicity 0), the git commit; and samples.jsonl may be gone.
    # A required part that is missing is an error instead (test_broken_results_json_raises_harness_error).
    run_dir = write_demo_run(tmp_path / "run", training=False, judged=False, qualitative_rows=0)

    def strip(r):
        assert r["qualitative"] == [] and "verdict" not in r and "training" not in r["metrics"]
        for phase in ("before", "after"):  # as a run without a second classifier writes them
            r["metrics"][phase]["second_toxicity_mean"] = None
        r["metrics"]["after"]["rouge2"] = None
        r["metrics"]["before"]["kl_per_sequence_mean"] = float("nan")
        r["metrics"]["comparison"].update(mean_improvement=None, std_improvement=None, mean_improvement_ci_low=None,
                                          mean_improvement_ci_high=None, rouge_l_drop=None)
        r["environment"]["git_commit"] = None

    rewrite_results(run_dir, strip)
    (run_dir / "samples.jsonl").unlink()
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find(id="overall").text()) == "NOT JUDGED"
    assert dom.find("section", id="verdict").find_all("tr") == []
    training = ws(dom.find("section", id="training").text())
    assert "Training not measured" in training
    assert dom.find("section", id="training").find_all("svg") == []
    tox = dom.find("section", id="toxicity")
    assert tox.find_all("svg", data_plot="toxicity-histogram") == []
    assert "Histogram not drawn" in ws(tox.text())
    assert tox.find_all("svg", data_plot="toxicity-means")  # means come from results.json
    assert ws(tox.find("tr", data_metric="mean_improvement").find_all("td")[1].text()) == "not measured"
    quality = dom.find("table", id="quality-table")

    def row(key):
        return cells(quality.find("tr", data_metric=key))

    assert row("rouge2")[2:4] == ["not measured", "not measured"]
    assert row("second_toxicity_mean")[2] == "not measured"
    assert row("kl_per_sequence_mean")[1] == "not measured"
    assert "No samples" in ws(dom.find("section", id="samples").text())
    assert ws(dom.find(id="git-commit").text()) == "not recorded"
    assert ws(dom.find(id="run-id").text()) == "run"


def test_qualitative_falls_back_to_samples(tmp_path, undrawn_plots):
    # eval.qualitative_rows = 0: results.json holds no qualitative rows, the page ranks samples.jsonl's
    run_dir = write_demo_run(tmp_path / "run", training=False, num_samples=12, qualitative_rows=0)
    assert load_results(run_dir)["qualitative"] == []
    samples = read_jsonl(run_dir / "samples.jsonl")  # in prompt order, not ranked: the renderer sorts them
    file_diffs = [s["reward_after"] - s["reward_before"] for s in samples]
    assert file_diffs != sorted(file_diffs, reverse=True)
    dom = parse(render_run(run_dir).read_text())
    rows = _ranked_rows(dom)
    assert len(rows) == 12
    diffs = [d for _, d, _ in sorted(rows, key=lambda x: x[2])]
    assert diffs == sorted(diffs, reverse=True)
    assert diffs == pytest.approx(sorted(file_diffs, reverse=True))
    assert "from samples.jsonl" in ws(dom.find("section", id="samples").text())


def test_eval_only_run_with_train_stats_still_plots_them(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run", steps=12)
    rewrite_results(run_dir, lambda r: r["metrics"].pop("training"))
    dom = parse(render_run(run_dir).read_text())
    section = dom.find("section", id="training")
    assert "Training not measured" in ws(section.text())
    assert len(section.find_all("svg")) == 9


# --------------------------------------------------------------------------------------------
# errors

def _set(path: str, value):
    """A change to a valid results.json: set the key at a dotted path (``metrics.before.toxicity_mean``)."""
    *parents, last = path.split(".")

    def change(r):
        for p in parents:
            r = r[p]
        r[last] = value
    return change


def _drop(path: str):
    *parents, last = path.split(".")

    def change(r):
        for p in parents:
            r = r[p]
        r.pop(last)
    return change


# case -> (the file's text, or a change to the demo's valid results.json; what the message must say)
BROKEN = {
    "missing": (None, "file not found"),
    "not-json": ('{"schema_version": 1, "metrics": {', "not valid JSON"),
    "array": ("[1, 2]", "must hold a JSON object, got list"),
    "no-metrics": (_drop("metrics"), "results.json: metrics: is missing"),
    "no-after": (_drop("metrics.after"), "results.json: metrics.after: is missing"),
    "no-config": (_drop("config"), "results.json: config: is missing"),
    "no-created": (_drop("created"), "results.json: created: is missing"),
    "empty-run-id": (_set("run_id", ""), "results.json: run_id: "),
    "bad-metric": (_set("metrics.before.toxicity_mean", "low"),
                   "results.json: metrics.before.toxicity_mean: 'low' is not of type 'number'"),
    "bad-verdict": (_set("verdict.bounds", 3), "results.json: verdict.bounds: 3 is not of type 'array'"),
    "bad-qualitative": (_set("qualitative", {"a": 1}), "results.json: qualitative: {'a': 1} is not of type 'array'"),
    "future-schema": (_set("schema_version", 99), "schema_version 99 is not supported"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_results_json_raises_harness_error(tmp_path, demo, case):
    broken, fragment = BROKEN[case]
    if callable(broken):  # one key of a valid file broken
        results = copy.deepcopy(demo["results"])
        broken(results)
        text = json.dumps(results)
    else:
        text = broken
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "index.html").write_text("old page")
    if text is not None:
        (run_dir / "results.json").write_text(text)
    with pytest.raises(HarnessError) as info:
        render_run(run_dir)
    message = str(info.value)
    assert str(run_dir / "results.json") in message and fragment in message
    assert (run_dir / "index.html").read_text() == "old page"  # the old page is left alone
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["index.html"] + (["results.json"] if text else []))


def test_missing_run_folder_and_malformed_jsonl(tmp_path, undrawn_plots):
    with pytest.raises(HarnessError, match="run folder not found"):
        render_run(tmp_path / "nope")
    run_dir = write_demo_run(tmp_path / "run", training=False, num_samples=4)
    with (run_dir / "samples.jsonl").open("a") as f:
        f.write("\n{not json\n")
    with pytest.raises(HarnessError) as info:
        render_run(run_dir)
    assert "samples.jsonl" in str(info.value) and "line 6" in str(info.value)


def test_load_results_accepts_a_valid_file(demo):
    results = load_results(demo["dir"])
    assert results["run_id"] == "run-demo" and results["metrics"]["training"]["steps"] == 40


# --------------------------------------------------------------------------------------------
# the index of runs

def test_index_of_an_empty_folder_and_a_missing_one(tmp_path):
    dom = parse(render_index(tmp_path).read_text())
    assert "No run folder with a results.json was found" in ws(dom.text())
    assert dom.find_all("svg") == []
    with pytest.raises(HarnessError, match="reports folder not found"):
        render_index(tmp_path / "missing")


def test_index_links_are_url_encoded(tmp_path, undrawn_plots):
    reports = tmp_path / "reports"
    write_demo_run(reports / "run #1?x", training=False, num_samples=4)
    dom = parse(render_index(reports).read_text())
    assert dom.find("tr", data_run_id="run #1?x").find("a").attrs["href"] == "run%20%231%3Fx/index.html"


# --------------------------------------------------------------------------------------------
# formatting

@pytest.mark.parametrize("value,text", [
    (None, "not measured"), (float("nan"), "NaN"), (math.inf, "∞"), (0.0, "0"), (3, "3"), (True, "yes"),
    (0.123456, "0.1235"), (12.345678, "12.35"), (123456.7, "123,457"), (0.000349, "0.0003490"),
    (0.0000123, "1.230e-05"), (0.958, "0.9580"), (-0.148, "-0.1480"), (4.6, "4.600"), (5.0, "5.000"),
    (9999.7, "10,000"), (-2.5e-7, "-2.500e-07"),
])
def test_fmt_num(value, text):
    assert fmt_num(value) == text


def test_other_formatters():
    assert fmt_pct(0.4302) == "43.0%" and fmt_pct(None) == "not measured"
    assert fmt_signed(0.5) == "+0.5000" and fmt_signed(-0.5) == "-0.5000" and fmt_signed(0) == "0"
    # a reward difference below the noise floor is no change, never "+2.384e-07"
    assert [fmt_diff(v) for v in (2.384e-07, -3.1e-07, 0.0, -0.0935, 1.2, None)] == [
        "0", "0", "0", "-0.09350", "+1.200", "not measured"]
    assert [fmt_duration(s) for s in (0.25, 59.94, 61, 3599.6, 3725)] == ["0.2 s", "59.9 s", "1 min 01 s",
                                                                           "1 h 00 min", "1 h 02 min"]


def test_the_verdict_figures_of_every_judge_and_the_detectable_effect_are_shown(demo):
    dom, c = demo["dom"], demo["results"]["metrics"]["comparison"]
    table = dom.find("table", id="improvement-table")
    assert cells(table.find("tr", data_metric="logp_clean_gain"))[1] == fmt_signed(c["logp_clean_gain"])
    for key in ("response_mean_improvement", "second_mean_improvement", "min_detectable_improvement"):
        assert c[key] is not None, f"the demo measures {key}"
        assert cells(table.find("tr", data_metric=key))[1] == fmt_pct(c[key])
    second = cells(table.find("tr", data_metric="second_mean_improvement"))[2]
    low, high = fmt_pct(c["second_mean_improvement_ci_low"]), fmt_pct(c["second_mean_improvement_ci_high"])
    assert f"[{low}, {high}]" in second
    gap = cells(table.find("tr", data_metric="judge_gap"))[1]
    assert gap.lstrip("+") == fmt_pct(c["judge_gap"])


def test_a_metric_that_left_its_baseline_is_shown_and_fails_the_headline(tmp_path, undrawn_plots):
    run_dir = write_demo_run(tmp_path / "run")
    mean = load_results(run_dir)["metrics"]["comparison"]["mean_improvement"]
    checks = [{"metric": "comparison.mean_improvement", "mean": mean + 0.3, "tolerance": 0.05, "value": mean,
               "passed": False},
              {"metric": "after.rougeL", "mean": 0.5, "tolerance": 0.05, "value": 0.51, "passed": True}]
    def plant(r):
        for b in r["verdict"]["bounds"]:  # every bound holds: only the baseline fails
            b["passed"] = True
        r["verdict"]["passed"] = True
        r["baseline"] = {"file": "baselines/tiny.json", "passed": False, "seeds": [0, 1, 2], "checks": checks}

    rewrite_results(run_dir, plant)
    dom = parse(render_run(run_dir).read_text())
    assert ws(dom.find(id="overall").text()) == "FAIL"
    failed = dom.find("tr", data_baseline_metric="comparison.mean_improvement")
    assert "fail" in failed.classes() and cells(failed)[3] == fmt_num(mean)
    assert "pass" in dom.find("tr", data_baseline_metric="after.rougeL").classes()


# --------------------------------------------------------------------------------------------
# report nits: rows that need k > 1, the folded config, the link to the history, significant digits

def test_per_prompt_rows_need_several_samples(tmp_path, undrawn_plots):
    # with one sample per prompt, "expected maximum toxicity" is the mean and "toxicity probability" the toxic rate
    run_dir = write_demo_run(tmp_path / "run", training=False, num_samples=12)
    m = load_results(run_dir)["metrics"]
    assert m["comparison"]["samples_per_prompt"] == 1
    for phase in ("before", "after"):  # the repetition the page must not show as two more figures
        assert m[phase]["expected_max_toxicity"] == pytest.approx(m[phase]["toxicity_mean"])
    dom = parse(render_run(run_dir).read_text())
    table = dom.find("table", id="toxicity-table")
    keys = [tr.attrs["data-metric"] for tr in table.find_all("tr") if "data-metric" in tr.attrs]
    assert "toxicity_mean" in keys and "toxic_rate" in keys
    assert "expected_max_toxicity" not in keys and "toxicity_probability" not in keys
    note = ws(dom.find(id="per-prompt-note").text())
    assert "expected maximum toxicity" in note and "samples_per_prompt > 1" in note

    # with k > 1 they are figures of their own and are shown
    rewrite_results(run_dir, _set("metrics.comparison.samples_per_prompt", 4))
    dom = parse(render_run(run_dir).read_text())
    row = cells(dom.find("table", id="toxicity-table").find("tr", data_metric="expected_max_toxicity"))
    assert row[1:3] == [fmt_num(m["before"]["expected_max_toxicity"]), fmt_num(m["after"]["expected_max_toxicity"])]
    assert dom.find_all(id="per-prompt-note") == []


def test_config_table_is_folded(demo):
    details = demo["dom"].find("details", id="config")
    assert "open" not in details.attrs
    rows = [tr for tr in details.find_all("tr") if tr.find_all("td")]
    assert len(rows) == len(flatten_config(demo["results"]["config"]))  # every setting, behind the fold


def _significant_digits(text: str) -> int | None:
    """Significant digits of a formatted number (None for an integer, zero, a percentage or text)."""
    t = text.replace(",", "").lstrip("+-−<>= ")
    if not re.fullmatch(r"\d+\.\d+(e[-+]\d+)?", t):
        return None
    mantissa = t.split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def test_table_numbers_have_four_significant_digits(demo):
    # one format in every table: 4 significant digits, trailing zeros kept (0.9580, not 0.958 next to 0.4388)
    dom = demo["dom"]
    numbers = []
    for table_id in ("verdict-table", "toxicity-table", "improvement-table", "quality-table", "best-table"):
        for td in dom.find("table", id=table_id).find_all("td"):
            if "num" in td.classes():
                numbers.append(ws(td.text()))
    digits = {text: _significant_digits(text) for text in numbers}
    counted = [d for d in digits.values() if d is not None]
    assert len(counted) > 40, digits
    assert set(counted) == {4}, {t: d for t, d in digits.items() if d not in (None, 4)}
    kpi = ws(dom.find("section", id="toxicity").find("div", **{"class": "kpis"}).text())
    gain = demo["results"]["metrics"]["comparison"]["reward_gain"]
    assert fmt_signed(gain) in kpi and _significant_digits(fmt_signed(gain)) == 4


# --------------------------------------------------------------------------------------------
# the history page: judged runs apart from evaluation-only ones, trends per configuration
