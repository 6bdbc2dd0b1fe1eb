"""Provenance (issue 25): revisions of local directories, the prompts' fingerprint, the run files' manifest and
``detox-harness verify``, a baseline judged by another revision refused, the cached "before"'s key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import evalcache, provenance
from harness.cli import main
from harness.config import load_config
from harness.errors import EXIT_BAD_INPUT, EXIT_BOUND_FAILED, EXIT_PASS, HarnessError
from harness.metrics import EvalOutput

ROOT = Path(__file__).resolve().parents[2]


def _model_dir(tmp_path: Path, weights: bytes = b"\x00\x01weights") -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"id2label": {"0": "ok", "1": "toxic"}}')
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_a_directory_revision_changes_with_its_weights_and_configs_only(tmp_path):
    d = _model_dir(tmp_path)
    first = provenance.revision_of("my/model", str(d))
    assert first["kind"] == "directory" and first["revision"].startswith("sha256:") and first["location"] == "my/model"
    (d / "training.log").write_text("not a weight nor a config")
    (d / "checkpoints").mkdir()
    assert provenance.revision_of("my/model", str(d)) == first
    (d / "model.safetensors").write_bytes(b"\x00\x02weights")  # one byte
    assert provenance.revision_of("my/model", str(d))["revision"] != first["revision"]


def test_a_hub_id_outside_the_cache_has_no_revision_yet(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    entry = provenance.revision_of("someone/not-downloaded-model")
    assert entry == {"location": "someone/not-downloaded-model", "kind": "hub", "revision": None}
    assert provenance.revision_of(None) is None


def test_a_hub_snapshot_is_pinned_by_its_commit(monkeypatch, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--judge" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--judge" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--judge" / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert provenance.revision_of("org/judge") == {"location": "org/judge", "kind": "hub", "revision": commit}


def test_the_rows_fingerprint_sees_a_changed_prompt_and_the_order():
    rows = [{"id": "a", "query": "hello there", "input_ids": [1, 2, 3]}, {"id": "b", "query": "x", "input_ids": [4]}]
    same = provenance.rows_fingerprint([rows])
    assert same == provenance.rows_fingerprint([[dict(r) for r in rows]])
    assert len(same) == 64
    assert provenance.rows_fingerprint([rows[::-1]]) != same
    changed = [dict(rows[0], query="hello there!"), rows[1]]
    assert provenance.rows_fingerprint([changed]) != same
    assert provenance.rows_fingerprint([rows[:1], rows[1:]]) != same  # train/test split is part of it


def _run_files(run_dir: Path) -> Path:
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"run_id": "r"}\n')
    (run_dir / "samples.jsonl").write_text('{"prompt_index": 0, "response_after": "a calm summary"}\n')
    (run_dir / "config.yaml").write_text("preset: tiny\n")
    provenance.write_manifest(run_dir)
    return run_dir


def test_verify_passes_an_untouched_run_and_names_a_one_byte_change(tmp_path, capsys):
    run_dir = _run_files(tmp_path / "run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"results.json", "samples.jsonl", "config.yaml"}
    assert main(["verify", str(run_dir)]) == EXIT_PASS
    data = bytearray((run_dir / "samples.jsonl").read_bytes())
    data[-3] ^= 0x01  # one byte of one summary
    (run_dir / "samples.jsonl").write_bytes(bytes(data))
    assert main(["verify", str(run_dir)]) == EXIT_BOUND_FAILED
    out = capsys.readouterr().out
    assert "samples.jsonl: sha256" in out and "results.json" not in out.split("differ from")[1]


def test_verify_without_a_manifest_is_bad_input(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["verify", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT


def _models(reward_revision: str) -> dict:
    return {"policy": {"location": "tiny://policy", "kind": "directory", "revision": "sha256:aa"},
            "reward_model": {"location": "tiny://classifier", "kind": "directory", "revision": reward_revision},
            "second_judge": None, "faithfulness_judge": None, "adapter": None}


def test_a_baseline_of_another_judge_revision_is_refused_naming_the_model():
    baseline = {"models": _models("sha256:" + "1" * 64)}
    provenance.require_same_judges(_models("sha256:" + "1" * 64), baseline, "b.json")  # same: fine
    provenance.require_same_judges(_models("sha256:" + "2" * 64), {}, "old.json")  # recorded none: not checked
    with pytest.raises(HarnessError) as e:
        provenance.require_same_judges(_models("sha256:" + "2" * 64), baseline, "b.json")
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert "reward model tiny://classifier" in str(e.value) and "--baseline" in str(e.value)


def test_run_refuses_a_baseline_made_with_another_reward_model_revision_before_running(tmp_path, capsys):
    """The committed tiny baseline, with its reward model's revision changed: exit 2 at planning, nothing runs."""
    baseline = json.loads((ROOT / "baselines" / "tiny.json").read_text())
    baseline["models"] = _models("sha256:" + "3" * 64)
    path = tmp_path / "other-judge.json"
    path.write_text(json.dumps(baseline))
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--output", str(out), "--baseline", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another revision of reward model tiny://classifier" in err
    assert not out.exists()


def test_the_before_cache_key_holds_what_before_depends_on(tmp_path):
    cfg = load_config("tiny")
    models = _models("sha256:" + "4" * 64)
    key = evalcache.before_key(cfg, models, "f" * 64)
    other_seed = load_config("tiny", overrides=["seed=7", "ppo.learning_rate=0.001"])  # not what before reads
    assert evalcache.before_key(other_seed, models, "f" * 64) == key
    for changed in (evalcache.before_key(load_config("tiny", overrides=["eval.seed=1"]), models, "f" * 64),
                    evalcache.before_key(load_config("tiny", overrides=["eval.temperature=0.7"]), models, "f" * 64),
                    evalcache.before_key(cfg, _models("sha256:" + "5" * 64), "f" * 64),
                    evalcache.before_key(cfg, models, "e" * 64),
                    evalcache.before_key(cfg, models, "f" * 64, bare=True)):
        assert evalcache.key_digest(changed) != evalcache.key_digest(key)
    out = EvalOutput(metrics={"toxicity_mean": 0.25}, samples=[{"prompt_index": 0, "toxicity": 0.25}], seconds=9.0)
    assert evalcache.load(tmp_path, key) is None
    evalcache.store(tmp_path, key, out)
    hit = evalcache.load(tmp_path, key)
    assert hit.metrics == out.metrics and hit.samples == out.samples
    assert evalcache.load(tmp_path, evalcache.before_key(cfg, models, "e" * 64)) is None
    assert evalcache.load(None, key) is None  # --no-cache


def test_report_to_names_known_trackers_only():
    from harness.errors import ConfigError

    assert load_config("tiny", overrides=["output.report_to=tensorboard,mlflow"]).output.report_to == \
        ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="output.report_to.*tensorboard, mlflow"):
        load_config("tiny", overrides=["output.report_to=[wandb]"])
