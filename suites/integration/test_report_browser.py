"""The HTML report in a real browser: headless Chromium loads the page of a real tiny-world run.

Checks that the page loads without a single console message (the page has no JavaScript, so any
message is an error or injected code running), that the verdict and the plots are in the live
DOM, and saves screenshots under ``<--report-dir>/screenshots/`` (a temporary directory unless
``--report-dir`` is given: never into the checkout). A first test proves the
console detector itself: a page with a deliberate JavaScript error must be flagged.

Needs Debian's ``chromium`` (``apt-get install chromium``); skipped without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.report import render_index, render_run
from harness.report.demo import demo_created, write_demo_run

CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic",
         "--enable-logging=stderr", "--v=0"]

# Chromium logs every console message (log, warn, error, uncaught exception) to stderr as
#   [pid:tid:MMDD/HHMMSS.ffffff:INFO:CONSOLE:12] "Uncaught ReferenceError: x is not defined", source: file:///... (12)
# (older builds: "INFO:CONSOLE(12)"). The rest of stderr is browser noise (D-Bus, GPU probing).
_CONSOLE = re.compile(r"(?:[:\]]CONSOLE[:(]|\bUncaught\b)")


def console_messages(stderr: str) -> list[str]:
    """The console lines in Chromium's stderr."""
    return [line.strip() for line in stderr.splitlines() if _CONSOLE.search(line)]


def chromium(page: Path, tmp_path: Path, *action: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *action, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def load(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after load (serialized) and the console messages it produced."""
    proc = chromium(page, tmp_path, "--dump-dom")
    return proc.stdout, console_messages(proc.stderr)


def screenshot(page: Path, out: Path, tmp_path: Path, size: str = "1280,2400") -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    proc = chromium(page, tmp_path, f"--screenshot={out}", f"--window-size={size}", "--hide-scrollbars")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]
    return console_messages(proc.stderr)


class _Elements(HTMLParser):
    """Tag names and attributes of every element of a serialized DOM, plus its text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, **attrs) -> list[tuple[str, dict]]:
        return [(t, a) for t, a in self.elements
                if all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


# --------------------------------------------------------------------------------------------

def test_console_detector_flags_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><head><title>broken</title></head><body><p>hi</p>"
                      "<script>undefinedFunctionForTheDetector();</script></body></html>")
    _, messages = load(broken, tmp_path)
    assert any("undefinedFunctionForTheDetector" in m and "Uncaught" in m for m in messages), messages

    clean = tmp_path / "clean.html"
    clean.write_text("<!DOCTYPE html><html><head><title>clean</title></head><body><p>hi</p></body></html>")
    dom, messages = load(clean, tmp_path)
    assert messages == [] and "<p>hi</p>" in dom


@pytest.fixture
def screenshots(report_dir) -> Path:
    return report_dir / "screenshots"


def test_report_of_a_real_run_in_chromium(tiny_run_dir, tmp_path, screenshots):
    # render into a copy so the session's run folder is left as the run wrote it
    reports = tmp_path / "reports"
    run_dir = reports / Path(tiny_run_dir).name
    shutil.copytree(tiny_run_dir, run_dir)
    page = render_run(run_dir)
    size = page.stat().st_size
    print(f"\nreport page: {page} ({size / 1024:.0f} KiB)")
    assert size < 1_000_000

    dom, messages = load(page, tmp_path)
    assert messages == [], "console messages while loading the report:\n" + "\n".join(messages)
    elements = _Elements(dom)
    assert elements.having(id="verdict"), "verdict section missing from the DOM"
    overall = [a for t, a in elements.elements if a.get("id") == "overall"]
    assert overall and overall[0].get("data-overall") in {"PASS", "FAIL", "NOT JUDGED"}
    plots = {a.get("data-plot") for t, a in elements.elements if t == "svg" and "data-plot" in a}
    assert {"toxicity-histogram", "toxicity-means"} <= plots, plots
    if (run_dir / "train_stats.jsonl").is_file():
        assert {"train-objective-kl", "train-env-reward-mean", "train-ppo-loss-policy"} <= plots, plots
    if (run_dir / "curve.jsonl").is_file():  # the over-optimisation curve (issue 24): both judges, and quality
        assert {"curve-improvement-kl", "curve-improvement-step", "curve-quality"} <= plots, plots
        assert elements.having(id="curve-table")
    assert not [t for t, _ in elements.elements if t in ("script", "img", "iframe")]

    out = screenshots / "report.png"
    assert screenshot(page, out, tmp_path) == []
    assert out.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"screenshot: {out}")

    # the history page with this run in it
    index = render_index(reports)
    dom, messages = load(index, tmp_path)
    assert messages == [], "\n".join(messages)
    elements = _Elements(dom)
    links = {a.get("href") for t, a in elements.elements if t == "a" and not a.get("href", "").startswith("#")}
    assert links == {f"{run_dir.name}/index.html"}
    assert {a.get("data-plot") for t, a in elements.elements if t == "svg"} == {
        "trend-toxicity", "trend-improvement", "trend-kl", "trend-judge"}
    screenshot(index, screenshots / "index.png", tmp_path)
    print(f"screenshot: {screenshots / 'index.png'}")


def test_the_curve_section_renders_in_chromium(tmp_path, screenshots):
    # the demo run has a curve.jsonl: the section, its three plots and its table, with nothing on the console
    run_dir = write_demo_run(tmp_path / "reports" / "curve", num_samples=12, steps=20)
    page = render_run(run_dir)
    dom, messages = load(page, tmp_path)
    assert messages == [], "\n".join(messages)
    elements = _Elements(dom)
    assert elements.having(id="curve") and elements.having(id="curve-table")
    plots = {a.get("data-plot") for t, a in elements.elements if t == "svg" and "data-plot" in a}
    assert {"curve-improvement-kl", "curve-improvement-step", "curve-quality"} <= plots, plots
    out = screenshots / "curve.png"
    assert screenshot(page, out, tmp_path) == [] and out.stat().st_size > 20_000


def test_injected_markup_stays_text_in_chromium(tmp_path):
    # if any of this ran, it would log to the console (the detector above proves that is caught)
    payload = ("<script>console.error('xss-script-ran')</script>"
               "<img src=x onerror=\"console.error('xss-img-ran')\">")
    run_dir = write_demo_run(tmp_path / "reports" / "xss", toxic_text=payload, num_samples=12, steps=5)
    dom, messages = load(render_run(run_dir), tmp_path)
    assert messages == [], "\n".join(messages)
    elements = _Elements(dom)
    assert not [t for t, _ in elements.elements if t in ("script", "img")]
    assert payload in "".join(elements.text)  # shown to the reader as text


# --------------------------------------------------------------------------------------------
# a phone-sized window: 400 px wide

# Measures the laid-out page and writes the result into the probe's DOM (``--dump-dom`` returns it). Headless
# Chromium keeps its window at least 500 px wide, so the page is laid out in a 400 px wide ``srcdoc`` frame of a
# probe page (a frame of the same origin: the script in it can write to the probe). The script goes into that
# copy only: the pages themselves have no JavaScript.
_MEASURE = """<script>
(function () {
  var vw = document.documentElement.clientWidth;
  var out = {viewport: vw, page: document.documentElement.scrollWidth, tables: [], cut: []};
  document.querySelectorAll("table").forEach(function (t) {
    var box = t.closest(".scroll") || t.parentElement;
    var overflow = getComputedStyle(box).overflowX;
    var r = t.getBoundingClientRect(), b = box.getBoundingClientRect();
    out.tables.push({table: t.id || t.className, fits: r.right <= b.right + 1,
                     scrolls: overflow === "auto" || overflow === "scroll", box_right: b.right});
  });
  document.querySelectorAll("#verdict-table td").forEach(function (c) {
    var r = c.getBoundingClientRect();
    if (r.right > vw + 1 || r.left < -1) { out.cut.push(c.textContent.trim()); }
  });
  out.verdict_cells = document.querySelectorAll("#verdict-table td").length;
  // each plot's smallest text as drawn: its font size in the SVG's units times the SVG's scale
  out.plot_text = [];
  document.querySelectorAll("svg.plot").forEach(function (s) {
    var vb = s.viewBox.baseVal, scale = vb && vb.width ? s.getBoundingClientRect().width / vb.width : 1;
    var least = Infinity;
    s.querySelectorAll("text").forEach(function (t) {
      least = Math.min(least, parseFloat(getComputedStyle(t).fontSize) * scale);
    });
    if (least < Infinity) { out.plot_text.push({plot: s.getAttribute("data-plot"), px: least}); }
  });
  // the history tables' verdict column: on screen without scrolling the table sideways
  out.history_verdicts = 0; out.history_cut = [];
  document.querySelectorAll("table.runs").forEach(function (t) {
    var heads = Array.prototype.map.call(t.querySelectorAll("thead th"), function (h) { return h.textContent.trim(); });
    var col = heads.indexOf("verdict");
    if (col < 0) { return; }
    t.querySelectorAll("tbody tr").forEach(function (row) {
      var c = row.children[col], r = c.getBoundingClientRect();
      out.history_verdicts += 1;
      if (r.right > vw + 1 || r.left < -1) { out.history_cut.push(c.textContent.trim()); }
    });
  });
  var pre = parent.document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify(out);
  parent.document.body.appendChild(pre);
})();
</script>"""


def layout(page: Path, tmp_path: Path, width: int = 400) -> dict:
    """The page's layout in a ``width``-px wide frame, measured by a script added to a copy of the page."""
    import html as html_lib

    framed = page.read_text().replace("</body>", _MEASURE + "</body>")
    probe = page.with_name(f"layout-{width}-{page.name}")
    probe.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>probe</title></head>'
                     f'<body style="margin:0"><iframe style="width:{width}px;height:900px;border:0" '
                     f'srcdoc="{html_lib.escape(framed, quote=True)}"></iframe></body></html>')
    proc = chromium(probe, tmp_path, "--dump-dom", "--hide-scrollbars", "--window-size=800,1000")
    assert console_messages(proc.stderr) == [], proc.stderr[-2000:]
    match = re.search(r'<pre id="layout">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stdout[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def test_pages_fit_a_400px_window(tmp_path):
    # at 400 px nothing is cut off: the page never scrolls sideways, every table either fits its box or scrolls
    # inside it, and the verdict table's rows wrap so that every cell of it is on screen
    reports = tmp_path / "reports"
    run_dir = write_demo_run(reports / "narrow", created=demo_created(20), num_samples=16, steps=5)
    write_demo_run(reports / "narrow-eval", created=demo_created(21), num_samples=16, training=False, judged=False)
    page = render_run(run_dir)
    index = render_index(reports)
    for p in (page, index):
        m = layout(p, tmp_path)
        assert m["viewport"] == 400, m
        assert m["page"] <= m["viewport"], f"{p.name}: the page is {m['page']} px wide in a 400 px window"
        assert m["tables"], m
        for t in m["tables"]:
            assert t["fits"] or t["scrolls"], f"{p.name}: table {t['table']} is cut off: {t}"
            assert t["box_right"] <= m["viewport"] + 1, t
    m = layout(page, tmp_path)
    assert m["verdict_cells"] > 0 and m["cut"] == [], m["cut"]
    verdict = [t for t in m["tables"] if t["table"] == "verdict-table"]
    assert verdict and verdict[0]["fits"], verdict


def test_plot_text_and_the_history_verdicts_are_readable_at_400px(tmp_path):
    """At 400 px the plots' text was drawn about 5 px high and the history table's verdict column lay past the
    screen's edge: every plot's text is now drawn at READABLE_PX or more (a wide plot scrolls inside its box
    instead of shrinking), and every run's verdict is on screen without scrolling."""
    reports = tmp_path / "reports"
    judged = 3
    for i in range(judged):
        write_demo_run(reports / f"2026-05-0{i + 1}T120000Z-tiny-s{i}-a-long-run-name", created=demo_created(i + 1),
                       seed=i, num_samples=16, steps=5)
    write_demo_run(reports / "narrow-eval", created=demo_created(9), num_samples=16, training=False, judged=False)
    pages = {"run": render_run(reports / "2026-05-01T120000Z-tiny-s0-a-long-run-name"), "index": render_index(reports)}
    for name, page in pages.items():
        m = layout(page, tmp_path)
        assert m["page"] <= m["viewport"] == 400, m
        assert m["plot_text"], f"{name}: no plot measured"
        small = [p for p in m["plot_text"] if p["px"] < READABLE_PX]
        assert not small, f"{name}: plot text drawn under {READABLE_PX} px at 400 px: {small}"
        if name == "index":
            assert m["history_verdicts"] == judged and m["history_cut"] == [], m["history_cut"]
    shot = tmp_path / "screenshots" / "index-400.png"  # under tmp_path: never into the checkout
    assert screenshot(pages["index"], shot, tmp_path, size="400,1600") == []


READABLE_PX = 9  # px: the plots' smallest text (legends) is 8 units high in the SVG, their ticks 9
