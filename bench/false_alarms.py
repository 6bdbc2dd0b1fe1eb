#!/usr/bin/env python
"""False alarms, measured: fresh honest seeds and the planted regressions against the same gates.

1. **Honest seeds** that no calibration used (default 100-119 on the tiny world): each is a real
   ``detox-harness run --preset tiny --seed S --baseline baselines/tiny.json``; a FAIL of the bounds or of the
   baseline is a false alarm. Every second seed runs with ``ATEN_CPU_CAPABILITY=avx2`` (``--other-cpu``):
   torch's kernels for another CPU kind, so the baseline is checked on "another machine" as well. Reported:
   the count, the rate with its exact (Clopper-Pearson) 95% interval, and which gate failed how often.
2. **Planted regressions**: ``suites/integration/test_planted.py`` runs every case (its own plants, the real
   CLI); each case's results are judged here by the same bounds and baseline. Every case must fail.
3. **The old gates** (``--old-ref REV``, default the commit before the statistical gates): the same honest
   runs judged by that revision's ``thresholds.toml`` and ``baselines/tiny.json`` with its tolerances (4
   spreads), its rate bounds reading the point rates: the "before" column of the false-alarm table. (The runs'
   intervals are this revision's BCa intervals; the old ones were percentile intervals of the same resamples'
   kind, within about 0.01 of them.)

Writes ``--out`` (JSON) and ``--planted-out`` (the planted runs' metrics, for ``detox-harness calibrate
--planted``), and prints a table. Runs ``--jobs`` seeds at a time, each with ``--threads`` threads.

Usage::

    python bench/false_alarms.py                        # 20 seeds + planted: ~25 minutes on 2 cores
    python bench/false_alarms.py --planted-only         # the planted runs alone (~6 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import baselines as bl  # noqa: E402
from harness.thresholds import BOUNDS, OPERATORS, lookup, verdict  # noqa: E402

OLD_REF = "a942319"  # the last revision with the 4-spread tolerances and point-rate bounds
#: the old rate bounds read the point rates (the new ones read their upper Wilson bounds)
OLD_PATHS = {"max_empty_rate": ("after", "empty_rate"), "max_degenerate_rate": ("after", "degenerate_rate"),
             "max_copy_rate_increase": ("comparison", "copy_rate_increase")}


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def run_seed(seed: int, out: Path, threads: int, capability: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if capability:  # torch's CPU kernels of another CPU kind (AVX2 instead of AVX-512): another machine's rounding
        env["ATEN_CPU_CAPABILITY"] = capability
    if (out / "results.json").is_file():  # --work with finished runs: judge them again, run nothing
        return {"seed": seed, "exit": None, "seconds": None, "results": json.loads((out / "results.json").read_text()),
                "cpu_capability": capability or "native", "stderr": ""}
    # the baseline is applied here, after the run (judge): the same comparison as `run --baseline`
    cmd = [sys.executable, "-m", "harness.cli", "run", "--preset", "tiny", "--seed", str(seed), "--output", str(out),
           "--no-progress", "--no-report"]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    return {"seed": seed, "exit": proc.returncode, "seconds": round(time.time() - t, 1), "results": results,
            "cpu_capability": capability or "native",
            "stderr": proc.stderr[-1500:] if results is None else ""}


def judge(results: dict, bounds: dict, baseline: dict, *, old: bool = False) -> dict:
    """Which bounds and which baseline metrics a run fails, by the given gates."""
    if old:
        failed = []
        for name, limit in bounds.items():
            path, op, _ = BOUNDS[name]
            value = lookup(results["metrics"], OLD_PATHS.get(name, path))
            if name.startswith("min_sft") and "sft" not in results["metrics"]:
                continue
            ok = value is not None and OPERATORS[op](value, limit)
            failed += [] if ok else [name]
        moved = [name for name, m in baseline["metrics"].items()
                 if (v := bl._lookup(results["metrics"], tuple(name.split(".")))) is None
                 or abs(v - m["mean"]) > m["tolerance"]]
    else:
        rows = verdict(results, bounds)
        failed = [b.name for b in rows if not b.passed]
        values = {b.name: b.value for b in rows}
        try:
            moved = [c.metric for c in bl.compare(results, baseline) if not c.passed]
        except bl.HarnessError as e:  # a planted case of another config (drift, blind spot): not comparable
            moved = [f"(not comparable: {str(e).split(' (')[0]})"]
    out = {"failed_bounds": failed, "moved": moved, "false_alarm": bool(failed or moved)}
    return out if old else {**out, "values": values}  # each bound's measured value: how near its limit a run came


def nearest_approach(honest: list[dict], bounds: dict) -> dict:
    """For each bound, the honest run whose value came nearest its limit (the largest value of a ``<=`` bound,
    the smallest of a ``>=``): the margin a limit keeps over the honest seeds."""
    out = {}
    for name, limit in bounds.items():
        op = BOUNDS[name][1]
        seen = [(r["values"][name], r["seed"]) for r in honest if r.get("values", {}).get(name) is not None]
        if seen:
            value, seed = (max if op.startswith("<") else min)(seen)
            out[name] = {"op": op, "limit": limit, "value": value, "seed": seed}
    return out


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def git_show(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def planted_runs(report_dir: Path) -> dict[str, dict]:
    """The planted runs' results: run by test_planted.py into ``report_dir``, unless already there (--work)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if not list(report_dir.glob("*-planted-*/results.json")):
        subprocess.run([sys.executable, "-m", "pytest", "suites/integration/test_planted.py", "-q", "-p",
                        "no:cacheprovider", "-k", "fails_the_verdict", "--report-dir", str(report_dir)],
                       cwd=ROOT, env=env)
    cases = {}
    for d in sorted(report_dir.glob("*-planted-*")):
        if (d / "results.json").is_file():
            cases[d.name.split("-planted-", 1)[1]] = json.loads((d / "results.json").read_text())
    return cases


def table(header, rows) -> str:
    from harness.thresholds import text_table

    return text_table(header, [tuple(str(c) for c in r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="100-119", help="fresh honest seeds, e.g. 100-119 or 5,6,7")
    ap.add_argument("--baseline", default=str(ROOT / "baselines" / "tiny.json"))
    ap.add_argument("--jobs", type=int, default=2, help="seeds at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: no thread of one run waits "
                    "for another's core)")
    ap.add_argument("--other-cpu", default="avx2", help="every second seed runs with ATEN_CPU_CAPABILITY set to this "
                    "(another CPU kind's kernels: the baseline must hold on another machine); '' for none")
    ap.add_argument("--planted-only", action="store_true", help="only the planted runs")
    ap.add_argument("--no-planted", action="store_true", help="only the honest seeds")
    ap.add_argument("--old-ref", default=OLD_REF, help="git revision of the old gates ('' to skip them)")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory); finished runs found there "
                    "are judged again, not rerun")
    ap.add_argument("--runs-only", action="store_true", help="run the seeds into --work and stop (judge them later)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "false-alarms-tiny.json"))
    ap.add_argument("--planted-out", default=str(ROOT / "bench" / "results" / "planted-tiny.json"))
    args = ap.parse_args(argv)

    from harness.thresholds import load_bounds

    baseline_path = Path(args.baseline)
    baseline = None if args.runs_only else bl.load_baseline(baseline_path)
    bounds = load_bounds("tiny")
    old = None
    if args.old_ref:
        old_bounds = {k: float(v) for k, v in tomllib.loads(git_show(args.old_ref, "harness/thresholds.toml"))
                      ["tiny"].items()}
        old = (old_bounds, json.loads(git_show(args.old_ref, "baselines/tiny.json")))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="false-alarms-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "baseline": str(baseline_path),
                    "bounds": bounds, "family_alpha": {"baseline": bl.FAMILY_ALPHA}}
    if not args.planted_only:
        seeds = seeds_of(args.seeds)
        used = set(baseline["seeds"] if baseline else range(5)) & set(seeds)
        if used:
            raise SystemExit(f"seeds {sorted(used)} made the baseline: a false-alarm rate needs fresh seeds")
        threads = args.threads
        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda i_s: run_seed(i_s[1], work / f"seed-{i_s[1]}", threads,
                                                      args.other_cpu if i_s[0] % 2 else None), enumerate(seeds)))
        if args.runs_only:
            print(f"{len(runs)} runs in {work}")
            return 0
        honest = []
        for r in runs:
            # the run's own exit judged the bounds of its day; the gates judged here are the current ones
            row = {"seed": r["seed"], "cpu": r["cpu_capability"], "seconds": r["seconds"]}
            if r["results"] is None:
                row.update(error=r["stderr"], false_alarm=True, failed_bounds=["(no results)"], moved=[])
            else:
                row.update(judge(r["results"], bounds, baseline))
                if old:
                    row["old"] = judge(r["results"], old[0], old[1], old=True)
                c = r["results"]["metrics"]["comparison"]
                row["mean_improvement_ci_low"] = c["mean_improvement_ci_low"]
            honest.append(row)
        k, n = sum(r["false_alarm"] for r in honest), len(honest)
        report["honest"] = {"seeds": seeds, "runs": honest, "false_alarms": k, "n": n, "rate": k / n,
                            "ci95": clopper_pearson(k, n), "seconds": round(time.time() - t0, 1)}
        if old:
            ko = sum(r["old"]["false_alarm"] for r in honest if "old" in r)
            report["honest"]["old"] = {"ref": args.old_ref, "false_alarms": ko, "rate": ko / n,
                                       "ci95": clopper_pearson(ko, n)}
        print(table(("seed", "cpu", "bounds failed", "baseline moved", "old gates: bounds", "old: baseline"),
                    [(r["seed"], r["cpu"], ", ".join(r["failed_bounds"]) or "-",
                      ", ".join(r["moved"]) or "-",
                      ", ".join(r.get("old", {}).get("failed_bounds", [])) or "-",
                      ", ".join(r.get("old", {}).get("moved", [])) or "-") for r in honest]))
        nearest = nearest_approach(honest, bounds)
        report["honest"]["nearest"] = nearest
        print(table(("bound", "limit", "honest value nearest it", "seed"),
                    [(name, f"{near['op']} {near['limit']:g}", f"{near['value']:.4g}", near["seed"])
                     for name, near in nearest.items()]))
        lo, hi = report["honest"]["ci95"]
        print(f"false alarms: {k} of {n} fresh honest seeds ({k / n:.1%}, 95% interval {lo:.1%}..{hi:.1%})"
              + (f"; the old gates: {report['honest']['old']['false_alarms']} of {n}" if old else ""))
    if not args.no_planted:
        cases = planted_runs(work / "planted")
        planted = {}
        for name, results in cases.items():
            planted[name] = {**judge(results, bounds, baseline), "metrics": results["metrics"]}
        report["planted"] = {name: {k: v for k, v in p.items() if k != "metrics"} for name, p in planted.items()}
        Path(args.planted_out).write_text(json.dumps({"format": 1, "preset": "tiny", "cases": planted}, indent=1))
        print(table(("planted case", "bounds failed", "baseline moved"),
                    [(name, ", ".join(p["failed_bounds"]) or "NONE (it passed!)", len(p["moved"]))
                     for name, p in planted.items()]))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
