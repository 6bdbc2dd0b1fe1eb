"""The history page (reports/index.html) over several runs: order, links, trend groups, captions. Each test writes
several synthetic runs (harness.report.demo.write_demo_run, through the harness's own metrics and results code) and
renders every page and plot, seconds of matplotlib per run: kept out of the unit suite's minute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.report import load_results, render_index, render_run
from harness.report.demo import demo_created, write_demo_run
from harness.report.render import config_hash, fmt_num
from suites.report_dom import cells, parse, rewrite_results, ws

pytestmark = pytest.mark.integration


def _links_to_history(page: Path) -> bool:
    return any(a.attrs.get("href") == "../index.html" for a in parse(page.read_text()).find_all("a"))


def test_index_lists_runs_newest_first_with_links_and_trends(tmp_path):
    reports = tmp_path / "reports"
    # folder names sort the other way round from the creation times; one time has a +02:00 offset
    write_demo_run(reports / "a-oldest", created=demo_created(3), steps=4, num_samples=16, seed=1)
    write_demo_run(reports / "b-newest", created="2026-11-25T07:00:00+00:00", steps=4, num_samples=16, seed=2)
    write_demo_run(reports / "c-middle", created="2026-11-25T08:00:00+02:00", steps=4, num_samples=16, seed=3)
    (reports / "screenshots").mkdir()  # no results.json: not a run
    (reports / "d-broken").mkdir()
    (reports / "d-broken" / "results.json").write_text("{oops")
    page = render_index(reports)
    assert page == reports / "index.html"
    html = page.read_text()
    dom = parse(html)
    rows = dom.find("section", id="runs").find_all("tr", **{"class": "run"})
    assert [r.attrs["data-run-id"] for r in rows] == ["b-newest", "c-middle", "a-oldest"]
    links = [r.find("a").attrs["href"] for r in rows]
    assert [r.attrs["data-group"] for r in rows] == [config_hash(load_results(reports / "a-oldest")["config"])] * 3
    assert links == ["b-newest/index.html", "c-middle/index.html", "a-oldest/index.html"]
    assert all((reports / link).is_file() for link in links)  # pages rendered where missing
    plots = {svg.attrs["data-plot"] for svg in dom.find("section", id="trends").find_all("svg")}
    assert plots == {"trend-toxicity", "trend-improvement", "trend-kl", "trend-judge"}
    assert "screenshots" not in html
    broken = ws(dom.find("section", id="broken").text())
    assert "d-broken" in broken and "not valid JSON" in broken
    # each row shows its own numbers
    newest = json.loads((reports / "b-newest" / "results.json").read_text())
    cells = [ws(td.text()) for td in rows[0].find_all("td")]
    assert fmt_num(newest["metrics"]["before"]["toxicity_mean"]) in cells
    assert fmt_num(newest["metrics"]["after"]["toxicity_mean"]) in cells
    assert ws(dom.find(id="latest").text()).endswith(
        "PASS" if newest["verdict"]["passed"] else "FAIL")
    # the run pages link back to the history once it exists
    run_page = parse(render_run(reports / "a-oldest").read_text())
    assert any(a.attrs.get("href") == "../index.html" for a in run_page.find_all("a"))


def test_first_report_links_to_the_history_page(tmp_path):
    # the run job renders the run's page, then the history page: the first run of a reports folder must link to it
    reports = tmp_path / "reports"
    first = write_demo_run(reports / "first", training=False, num_samples=8)
    page = render_run(first)
    assert not (reports / "index.html").exists()
    index = render_index(reports)
    assert _links_to_history(page) and index == page.parent.parent / "index.html"
    assert any(a.attrs.get("href") == "first/index.html" for a in parse(index.read_text()).find_all("a"))
    # the second run's page links to the history that now exists; pages are not rewritten when it does
    second = write_demo_run(reports / "second", training=False, num_samples=8, seed=1)
    assert _links_to_history(render_run(second))
    before = page.stat().st_mtime_ns
    render_index(reports)
    assert page.stat().st_mtime_ns == before
    # a run folder outside any reports folder gets no dead link
    alone = write_demo_run(tmp_path / "alone", training=False, num_samples=8)
    assert not _links_to_history(render_run(alone))


def _overall(results: dict) -> str:
    return "PASS" if results["verdict"]["passed"] else "FAIL"


def test_history_keeps_eval_runs_apart_and_groups_trends_by_config(tmp_path):
    reports = tmp_path / "reports"
    small = dict(num_samples=16, qualitative_rows=6)
    # two seeds of one configuration, one run of another (more PPO steps), then an evaluation of the base model
    # and a trained run without bounds, both newer than every judged run
    write_demo_run(reports / "a", created=demo_created(20), steps=4, seed=1, **small)
    write_demo_run(reports / "b", created=demo_created(21), steps=4, seed=2, strength=0.3, **small)
    write_demo_run(reports / "x", created=demo_created(22), steps=6, seed=1, **small)
    write_demo_run(reports / "e", created=demo_created(23), training=False, judged=False, strength=0.0, **small)
    write_demo_run(reports / "u", created=demo_created(24), steps=4, judged=False, **small)
    results = {name: load_results(reports / name) for name in "abxeu"}
    assert "verdict" not in results["e"] and "training" not in results["e"]["metrics"]

    dom = parse(render_index(reports).read_text())
    # the headline is the newest judged run's verdict, never "NOT JUDGED" of a newer evaluation
    latest = dom.find(id="latest")
    assert latest.attrs["data-run-id"] == "x" and latest.attrs["data-overall"] == _overall(results["x"])
    assert ws(latest.text()).endswith(_overall(results["x"]))
    judged = [tr.attrs["data-run-id"] for tr in dom.find("section", id="runs").find_all("tr", **{"class": "run"})]
    apart = [tr.attrs["data-run-id"] for tr in dom.find("section", id="eval-runs").find_all("tr", **{"class": "run"})]
    assert judged == ["x", "b", "a"] and apart == ["u", "e"]
    kinds = {tr.attrs["data-run-id"]: ws(tr.find_all("td")[2].text())
             for tr in dom.find("table", id="eval-runs-table").find_all("tr", **{"class": "run"})}
    assert "evaluation only" in kinds["e"] and "not judged" in kinds["u"]

    # one trend group per configuration (seeds aside), holding judged runs only
    hashes = {name: config_hash(r["config"]) for name, r in results.items()}
    assert hashes["a"] == hashes["b"] != hashes["x"]
    groups = dom.find("section", id="trends").find_all("div", **{"class": "trend-group"})
    members = {g.attrs["data-group"]: [n.attrs["data-run-id"] for n in g.find_all("span") if "data-run-id" in n.attrs]
               for g in groups}
    assert members == {hashes["x"]: ["x"], hashes["a"]: ["a", "b"]}
    assert [g.attrs["data-group"] for g in groups] == [hashes["x"], hashes["a"]]  # the newest judged run's first
    for g in groups:
        assert {svg.attrs["data-plot"] for svg in g.find_all("svg")} == {"trend-toxicity", "trend-improvement",
                                                                          "trend-kl", "trend-judge"}
        n = len(members[g.attrs["data-group"]])
        caption = ws(g.find("figure", data_trend="trend-improvement").find("figcaption").text())
        assert f"one point per run ({n} run{'' if n == 1 else 's'})" in caption
    ids = [n.attrs["id"] for n in dom.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "duplicate element ids across the groups' plots"

    # what differs between the groups: ppo.steps, with each group's value
    table = dom.find("table", id="group-differences")
    rows = {tr.attrs["data-setting"]: cells(tr)[1:] for tr in table.find_all("tr") if "data-setting" in tr.attrs}
    assert rows == {"ppo.steps": [str(results["x"]["config"]["ppo"]["steps"]),
                                  str(results["b"]["config"]["ppo"]["steps"])]}


def test_trend_captions_name_only_what_the_plots_draw(tmp_path):
    reports = tmp_path / "reports"
    small = dict(num_samples=16, qualitative_rows=6, steps=4)
    write_demo_run(reports / "a", created=demo_created(20), seed=1, **small)
    write_demo_run(reports / "b", created=demo_created(21), seed=2, **small)
    b = load_results(reports / "b")
    bounds = {x["name"]: x["bound"] for x in b["verdict"]["bounds"]}

    def figures(dom):
        return {f.attrs["data-trend"]: (ws(f.find("figcaption").text()), ws(f.find("svg").text()))
                for f in dom.find("section", id="trends").find_all("figure")}

    shown = figures(parse(render_index(reports).read_text()))
    assert set(shown) == {"trend-toxicity", "trend-improvement", "trend-kl", "trend-judge"}
    for name, (caption, svg) in shown.items():  # a caption speaks of a dashed line exactly when one is drawn
        assert ("dashed line" in caption) == ("bound (newest run)" in svg), name
    assert f"min_improvement = {100 * bounds['min_improvement']:g}%" in shown["trend-improvement"][0]
    assert f"max_kl = {bounds['max_kl']:g}" in shown["trend-kl"][0]

    # the newest run of the group has neither bound: no dashed line, and no caption that mentions one
    def drop(r):
        r["verdict"]["bounds"] = [x for x in r["verdict"]["bounds"] if x["name"] not in ("min_improvement", "max_kl")]

    rewrite_results(reports / "b", drop)
    shown = figures(parse(render_index(reports).read_text()))
    for name, (caption, svg) in shown.items():
        assert "dashed" not in caption and "bound (newest run)" not in svg, name
    # and with no intervals recorded, no caption speaks of bars
    for run in ("a", "b"):
        rewrite_results(reports / run, lambda r: r["metrics"]["comparison"].update(mean_improvement_ci_low=None,
                                                                            mean_improvement_ci_high=None))
    caption = figures(parse(render_index(reports).read_text()))["trend-improvement"][0]
    assert "bars" not in caption and "one point per run (2 runs)" in caption
