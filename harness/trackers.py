"""A finished run exported to experiment trackers (``output.report_to``): TensorBoard and MLflow, both local-first.

Each tracker gets the same records, from the run's own files (what results.json and train_stats.jsonl hold):

- per PPO step, every numeric statistic of ``train_stats.jsonl`` (``ppo/<name>`` at that step): the training curve;
- the before and after metrics and the comparison (``before/<name>``, ``after/<name>``, ``comparison/<name>``);
- the verdict: ``verdict/passed`` (1 or 0) and, per bound, ``bound/<name>/measured``, ``bound/<name>/limit`` and
  ``bound/<name>/passed``; the verdict's status and table as text (TensorBoard) or tags and a JSON file (MLflow);
- the report page (and results.json, manifest.json) as an artifact (MLflow), or copied beside the event files
  (TensorBoard, which has no artifacts).

TensorBoard writes event files into ``<run>/tensorboard`` (``tensorboard --logdir reports``). MLflow logs to
``$MLFLOW_TRACKING_URI`` when set, else to the file store ``<output.dir>/mlruns`` (``mlflow ui --backend-store-uri
reports/mlruns``; MLflow 3 reads that store with ``MLFLOW_ALLOW_FILE_STORE=true``, which the export sets when no
tracking URI is given), experiment ``detox-harness-<preset>``, run name the run's id. Neither library is needed unless
named: they are the optional extras ``detox-harness[tensorboard]`` and ``detox-harness[mlflow]``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from .config import TRACKERS, flatten_dict
from .errors import HarnessError
from .thresholds import format_table

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
EXTRAS = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "mlflow": ("mlflow", "mlflow")}


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def records(results: dict, stats: list[dict]) -> dict:
    """What every tracker logs: ``{"steps": [(step, {name: value})], "scalars": {name: value}, "verdict": {...}}``."""
    steps = []
    for i, row in enumerate(stats):
        step = int(row.get("step", i))
        values = {f"ppo/{k}": v for k, v in ((k, _number(v)) for k, v in flatten_dict(row).items() if k != "step")
                  if v is not None}
        steps.append((step, values))
    scalars = {}
    for phase in ("before", "after", "comparison", "training", "sft"):
        for k, v in flatten_dict(results["metrics"].get(phase) or {}).items():
            number = _number(v)
            if number is not None:
                scalars[f"{phase}/{k}"] = number
    verdict = results.get("verdict") or {}
    scalars["verdict/passed"] = 1.0 if verdict.get("passed") else 0.0
    for b in verdict.get("bounds", []):
        scalars[f"bound/{b['name']}/limit"] = float(b["bound"])
        scalars[f"bound/{b['name']}/passed"] = 1.0 if b["passed"] else 0.0
        if b.get("value") is not None:
            scalars[f"bound/{b['name']}/measured"] = float(b["value"])
    return {"steps": steps, "scalars": scalars, "verdict": verdict}


def _verdict_text(results: dict) -> str:
    from .thresholds import BoundResult

    verdict = results.get("verdict") or {}
    keys = ("name", "bound", "op", "value", "passed", "description", "preset", "change", "reason")
    bounds = [BoundResult(**{k: b.get(k) for k in keys}) for b in verdict.get("bounds", [])]
    table = format_table(bounds).splitlines()[:-1]  # the rows; the verdict's own line follows
    return "\n".join([*table, f"verdict: {verdict.get('status', 'not judged')}",
                      *(f"  {reason}" for reason in verdict.get("reasons", []))])


def require_trackers(names) -> None:
    """Every named tracker's library is installed: else a HarnessError naming the extra to install."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise HarnessError("unknown tracker", field="output.report_to", value=name,
                               fix=f"use {', '.join(TRACKERS)}")
        package, module = EXTRAS[name]
        if importlib.util.find_spec(package) is None:
            raise HarnessError(f"{name} is not installed", field="output.report_to", value=name,
                               fix=f"pip install 'detox-harness[{name}]', or drop {name} from output.report_to")


def to_tensorboard(run_dir: Path, results: dict, stats: list[dict], report: Path | None = None) -> Path:
    """The run's records as TensorBoard event files in ``<run>/tensorboard``; returns that directory."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(run_dir) / TENSORBOARD_DIR
    rec = records(results, stats)
    last = rec["steps"][-1][0] if rec["steps"] else 0
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for step, values in rec["steps"]:
            for name, value in values.items():
                writer.add_scalar(name, value, step)
        for name, value in rec["scalars"].items():
            writer.add_scalar(name, value, last)
        writer.add_text("verdict", "```\n" + _verdict_text(results) + "\n```", last)
        writer.add_text("provenance", "```\n" + json.dumps(results.get("provenance") or {}, indent=1) + "\n```", last)
        if report is not None and Path(report).is_file():
            writer.add_text("report", str(report), last)
    finally:
        writer.close()
    if report is not None and Path(report).is_file():
        shutil.copy2(report, log_dir / Path(report).name)
    return log_dir


def to_mlflow(run_dir: Path, results: dict, stats: list[dict], report: Path | None = None) -> str:
    """The run's records as an MLflow run; returns its run id."""
    import mlflow

    run_dir = Path(run_dir)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # MLflow's local file store: MLflow 3 keeps it behind an opt-in (a database URI needs none)
        uri = (run_dir.parent / MLFLOW_DIR).resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_name = f"detox-harness-{results['preset']}"
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    rec = records(results, stats)
    verdict = rec["verdict"]
    run = client.create_run(experiment_id, run_name=results["run_id"],
                            tags={"verdict": str(verdict.get("status", "not judged")), "preset": results["preset"],
                                  "detox_harness.run_dir": str(run_dir.resolve())})
    run_id = run.info.run_id
    try:
        params = {k: str(v)[:500] for k, v in flatten_dict(results["config"]).items()}
        items = list(params.items())
        from mlflow.entities import Metric, Param

        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        stamp = 0
        metrics = [Metric(name.replace("/", "."), value, stamp, step) for step, values in rec["steps"]
                   for name, value in values.items()]
        last = rec["steps"][-1][0] if rec["steps"] else 0
        metrics += [Metric(name.replace("/", "."), value, stamp, last) for name, value in rec["scalars"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_dict(run_id, verdict, "verdict.json")
        client.log_text(run_id, _verdict_text(results), "verdict.txt")
        for path in (report, run_dir / "results.json", run_dir / "manifest.json"):
            if path is not None and Path(path).is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def export_run(run_dir: Path, results: dict, stats: list[dict], trackers, *, report: Path | None = None,
               echo=print) -> dict:
    """Export a finished run to each tracker of ``trackers``; returns ``{tracker: where}``. A tracker that fails
    is said and skipped: the run's verdict and files stand without it."""
    done = {}
    for name in trackers:
        try:
            if name == "tensorboard":
                done[name] = str(to_tensorboard(run_dir, results, stats, report))
            elif name == "mlflow":
                done[name] = to_mlflow(run_dir, results, stats, report)
            echo(f"{name}: exported the run ({done[name]})")
        except ImportError:
            echo(f"warning: output.report_to names {name} but it is not installed: pip install "
                 f"'detox-harness[{name}]'")
        except Exception as e:  # a tracker's fault never turns a judged run into a crash
            echo(f"warning: exporting the run to {name} failed ({type(e).__name__}: {e})")
    return done
