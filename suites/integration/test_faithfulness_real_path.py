"""The real presets' faithfulness path, end to end, offline: a run of the CLI whose judge is a local directory of
the real judge's architecture and labels (FacebookAI/roberta-large-mnli: a RobertaForSequenceClassification with
CONTRADICTION, NEUTRAL, ENTAILMENT, in that order), loaded by the same ``from_pretrained`` call that loads the hub
model. Its weights are random: what is checked is the path (loading, labels by name, windows, the figures in
every output), not the judge's skill, which suites/integration/test_tiny_world.py checks on ``tiny://nli``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from tiny_cli import run_cli

from harness import tiny

pytestmark = pytest.mark.integration

MNLI_LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}  # roberta-large-mnli's config


@pytest.fixture(scope="module")
def mnli_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

    rows = tiny.make_corpus(seed=0, rows={"train": 200})["train"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["dialogue"] for r in rows] + [r["summary"] for r in rows], vocab_size=600,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    with tempfile.TemporaryDirectory() as raw:
        bpe.save_model(raw)
        tok = RobertaTokenizer.from_pretrained(raw, model_max_length=64)  # small: every dialogue makes windows
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=3,
                           id2label=MNLI_LABELS, label2id={v: k for k, v in MNLI_LABELS.items()})
    out = tmp_path_factory.mktemp("roberta-mnli-tiny")
    RobertaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_run_judges_faithfulness_with_a_local_judge_of_the_real_architecture(mnli_dir, report_dir):
    out = report_dir / "faithfulness-real-path"
    code, stdout, stderr = run_cli(["run", "--preset", "tiny", "--output", str(out), "--no-progress", "--no-report",
                                    "ppo.steps=2", "eval.num_samples=16", f"eval.faithfulness_model={mnli_dir}"])
    assert code in (0, 1), stderr[-2000:]  # a verdict, not an error (two steps may fail the tiny bounds)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["eval"]["faithfulness_model"] == str(mnli_dir)
    for phase in ("before", "after"):
        m = results["metrics"][phase]
        assert 0.0 <= m["faithfulness_mean"] <= 1.0 and 0.0 <= m["faithful_rate"] <= 1.0
    assert results["metrics"]["comparison"]["faithfulness_drop_ci_high"] is not None
    names = {b["name"] for b in results["verdict"]["bounds"]}
    assert {"max_faithfulness_drop", "min_distinct_summary_rate"} <= names
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    assert all(0.0 <= s["faithfulness_before"] <= 1.0 and 0.0 <= s["faithfulness_after"] <= 1.0 for s in samples)
    assert "faithfulness" in stdout
