"""Issue 26 through a real (short) tiny run: a run from an adapter is judged from that adapter even when the KL
reference is the bare base, and a loosened bound and too little evidence are marked in the terminal, results.json
and the report and fail the run. One run of one PPO step (the fast unit suite plants the rest:
suites/unit/test_verdict_guards.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from tiny_cli import run_cli

from harness.config import load_config
from harness.models import TRAINED_ADAPTER, load_policy
from harness.plan import concrete
from harness.thresholds import FAIL, load_bounds, load_evidence

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def moved_adapter(tmp_path_factory):
    """A LoRA adapter of the tiny policy that is not the base: its B matrices drawn at random (a fresh LoRA's are
    zero), standing for an already trained checkpoint."""
    out = tmp_path_factory.mktemp("adapter") / "start"
    cfg = concrete(load_config("tiny"))
    torch.manual_seed(0)
    policy = load_policy(cfg.policy)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    policy.model.save_pretrained(out, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER])
    policy.tokenizer.save_pretrained(out)
    return out


def test_a_run_from_an_adapter_is_judged_from_it_and_loosened_or_thin_evidence_fails(report_dir, moved_adapter):
    out = report_dir / f"pytest-guards-{time.time_ns()}"
    preset = load_bounds("tiny")
    loose = preset["max_kl"] * 1e6  # the thresholds.max_kl=1e9
    code, stdout, stderr = run_cli(["run", "--preset", "tiny", "--output", str(out), "--no-progress",
                                    f"policy.adapter={moved_adapter}", "policy.reference=base", "ppo.steps=1",
                                    "eval.num_samples=3", "eval.bootstrap_resamples=1", f"thresholds.max_kl={loose}"])
    assert code == 1, stdout + stderr
    results = json.loads((out / "results.json").read_text())
    v = results["verdict"]
    # 3. "before" is the starting adapter (it differs from the bare base, the KL reference), the base a column
    assert results["metrics"]["before"]["kl_per_sequence_mean"] > 0
    assert results["policies"]["base"]["kl_per_sequence_mean"] == 0
    # 2. the preset's bounds beside the ones used; the loosened one marked everywhere
    assert v["preset_bounds"] == preset and v["loosened"] == ["max_kl"] and v["status"] == FAIL
    row = next(b for b in v["bounds"] if b["name"] == "max_kl")
    assert row["bound"] == loose and row["preset"] == preset["max_kl"] and row["change"] == "loosened"
    assert "LOOSENED" in stdout and "verdict: FAIL" in stdout
    assert "warning: thresholds.max_kl is loosened" in stdout
    page = (out / "index.html").read_text()
    assert 'data-change="loosened"' in page and "LOOSENED" in page
    # 4. too little evidence, with its own message
    least = load_evidence("tiny")
    failed = {e["check"]: e for e in v["evidence"] if not e["passed"]}
    assert set(failed) == set(least) and failed["min_num_samples"]["least"] == least["min_num_samples"]
    assert "not enough evidence" in stdout
