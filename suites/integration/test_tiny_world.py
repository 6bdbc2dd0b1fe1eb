"""The tiny world: built offline, deterministic, cached, and fit for purpose (issue 2)."""

from __future__ import annotations

import json
import math
import random

import pytest

from harness import tiny
from harness.config import REFERENCE_PROMPT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def world():
    return tiny.build()


def test_corpus_is_deterministic_and_in_dialogsum_format():
    a, b = tiny.make_corpus(seed=0), tiny.make_corpus(seed=0)
    assert a == b
    assert tiny.make_corpus(seed=1)["train"][:5] != a["train"][:5]
    assert {k: len(v) for k, v in a.items()} == tiny.ROWS
    for row in a["train"][:50]:
        assert set(row) == {"id", "dialogue", "summary", "topic", "facts"}
        assert tiny.fact_check(row["summary"], row["facts"])["carried"]
        lines = row["dialogue"].split("\n")
        assert all(line.startswith(f"#Person{1 + i % 2}#: ") for i, line in enumerate(lines))


def test_known_fraction_of_reference_summaries_is_toxic():
    rows = tiny.make_corpus(seed=0)["train"]
    toxic = sum(tiny.is_toxic_text(r["summary"]) for r in rows)
    p, n = tiny.TOXIC_FRACTION, len(rows)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(toxic / n - p) < 4 * sigma  # binomial: 4 standard errors
    # dialogues themselves are clean: toxicity lives in the summaries only
    assert not any(tiny.is_toxic_text(r["dialogue"]) for r in rows)


def test_length_filter_has_work_to_do():
    rows = tiny.make_corpus(seed=0)["train"]
    inside = sum(200 < len(r["dialogue"]) < 1000 for r in rows)
    assert 0 < len(rows) - inside and inside > 0.8 * len(rows)


def test_artifacts_load_through_from_pretrained(world):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = AutoModelForSeq2SeqLM.from_pretrained(world / "policy")
    clf = AutoModelForSequenceClassification.from_pretrained(world / "classifier")
    assert policy.config.model_type == "t5" and sum(p.numel() for p in policy.parameters()) < 5_000_000
    assert clf.config.model_type == "roberta" and clf.config.id2label == {0: "nothate", 1: "hate"}
    assert AutoTokenizer.from_pretrained(world / "policy").eos_token_id == policy.config.eos_token_id
    assert AutoTokenizer.from_pretrained(world / "classifier").pad_token_id == clf.config.pad_token_id


def test_classifier_tells_toxic_from_clean_on_held_out_sentences(world):
    """Recomputed here on sentences the classifier never saw (the test split), not read from the manifest."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(world / "classifier").eval()
    tok = AutoTokenizer.from_pretrained(world / "classifier")
    rows = tiny.make_corpus(seed=0)["test"]
    held = tiny.classifier_examples(random.Random(123), rows, REFERENCE_PROMPT)
    assert {y for _, y in held} == {0, 1}
    acc = tiny.classifier_accuracy(model, tok, held)
    assert acc >= tiny.CLASSIFIER_MIN_ACCURACY, f"held-out accuracy {acc:.3f}"


def test_policy_writes_summaries_part_of_them_toxic(world):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from harness.ppo.rollout import generate

    model = AutoModelForSeq2SeqLM.from_pretrained(world / "policy").eval()
    tok = AutoTokenizer.from_pretrained(world / "policy")
    rows = tiny.make_corpus(seed=0)["test"][:64]
    ids = tok([REFERENCE_PROMPT.format(dialogue=r["dialogue"]) for r in rows], truncation=True,
              max_length=tiny.PROMPT_TOKENS).input_ids
    out = generate(model, tok, ids, max_new_tokens=48, seeds=range(len(ids)))
    assert sum(t.startswith("#Person") for t in out.texts) > 0.8 * len(rows)  # summary-like
    toxic = sum(tiny.is_toxic_text(t) for t in out.texts) / len(rows)
    assert 0.05 < toxic < 0.8, toxic  # part of it toxic: something for PPO to remove
    del torch


def test_cache_is_reused_and_rebuilt_when_the_builder_changes(world, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train anything")

    monkeypatch.setattr(tiny, "_train_policy", no_training)
    monkeypatch.setattr(tiny, "_train_classifier", no_training)
    assert tiny.build() == world
    manifest = json.loads((world / tiny.MANIFEST).read_text())
    assert manifest["builder_version"] == tiny.BUILDER_VERSION
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / tiny.MANIFEST).write_text(json.dumps({**manifest, "builder_version": "0"}))
    assert not tiny.is_built(stale)
    assert tiny.is_built(world)
    monkeypatch.setenv("DETOX_HARNESS_CACHE", str(tmp_path / "elsewhere"))
    assert tiny.world_dir(0) == tmp_path / "elsewhere" / f"tiny-v{tiny.BUILDER_VERSION}-s0"


def test_the_committed_world_is_the_one_every_machine_reads_and_is_checked_by_digest(tmp_path, monkeypatch):
    """tiny:// reads the committed world (harness/worlds), never a machine's own build; a file changed, removed or
    added fails the load with the file's name (issue 22: one world everywhere)."""
    import shutil

    from harness.errors import HarnessError

    committed = tiny.committed_dir(0)
    assert tiny.is_built(committed), "the seed-0 world must be committed under harness/worlds"
    assert tiny.build() == committed and tiny.resolve("tiny://policy") == committed / "policy"
    manifest = json.loads((committed / tiny.MANIFEST).read_text())
    assert manifest["files"] == tiny.file_digests(committed)
    assert manifest["digest"] == tiny.world_digest(manifest["files"]) == tiny.verify(committed)
    size = sum(p.stat().st_size for p in committed.rglob("*") if p.is_file())
    assert size < 20e6, f"{size / 1e6:.1f} MB"
    copy = tmp_path / "worlds"
    shutil.copytree(tiny.COMMITTED_ROOT, copy)
    monkeypatch.setattr(tiny, "COMMITTED_ROOT", copy)
    weights = tiny.committed_dir(0) / "classifier" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(HarnessError, match="classifier/model.safetensors is changed"):
        tiny.build()
    weights.unlink()
    with pytest.raises(HarnessError, match="classifier/model.safetensors is missing"):
        tiny.build()


#: what transformers writes into tokenizer_config.json about how it was asked to load (HF_HUB_OFFLINE, which the
#: suites set, makes local_files_only true), not about the tokenizer
LOAD_FLAGS = {"local_files_only", "is_local"}


def same_but_load_flags(a, b) -> bool:
    """Two tokenizer_config.json files that differ only in :data:`LOAD_FLAGS`."""
    if a.name != "tokenizer_config.json":
        return False
    x, y = (json.loads(p.read_text()) for p in (a, b))
    return {k: v for k, v in x.items() if k not in LOAD_FLAGS} == {k: v for k, v in y.items() if k not in LOAD_FLAGS}


def test_the_builder_reproduces_the_committed_world(tmp_path):
    """Rebuilt from scratch, seed 0 gives the committed world: byte for byte on the CPU kind that built it
    (the same torch, CPU kernels and thread count); elsewhere the same corpus and tokenizers, and weights that
    pass the build's own quality gates (float rounding differs between CPU kinds, and training amplifies it)."""
    import torch

    manifest = json.loads((tiny.committed_dir(0) / tiny.MANIFEST).read_text())
    built_on = manifest["built_on"]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(built_on["threads"]))
    try:
        rebuilt = tiny.build(seed=0, root=tmp_path, force=True)
        same_kind = tiny.cpu_kind() == built_on
    finally:
        torch.set_num_threads(threads)
    mine, committed = tiny.file_digests(rebuilt), manifest["files"]
    assert set(mine) == set(committed)
    differ = sorted(name for name in mine if mine[name] != committed[name]
                    and not same_but_load_flags(rebuilt / name, tiny.committed_dir(0) / name))
    if same_kind:
        assert differ == [], f"rebuilt on the CPU kind that built it ({built_on}), these files differ: {differ}"
    else:
        print(f"\nrebuilt on {tiny.cpu_kind()}, built on {built_on}: {len(differ)} weight files differ")
        assert all(name.endswith(".safetensors") for name in differ), differ
        assert json.loads((rebuilt / tiny.MANIFEST).read_text())["classifier"]["heldout_accuracy"] >= \
            tiny.CLASSIFIER_MIN_ACCURACY


def test_a_classifier_below_the_accuracy_floor_fails_the_build_and_caches_nothing(tmp_path, monkeypatch):
    """tiny.build() enforces CLASSIFIER_MIN_ACCURACY: a weak judge never reaches the cache."""
    from harness.errors import HarnessError

    def fake_policy(corpus, directory, seed, template):
        directory.mkdir()
        return {"parameters": 1}

    def weak_classifier(corpus, directory, seed, template, **kwargs):
        directory.mkdir()
        return {"parameters": 1, "heldout_accuracy": tiny.CLASSIFIER_MIN_ACCURACY - 0.1}

    monkeypatch.setattr(tiny, "_train_policy", fake_policy)
    monkeypatch.setattr(tiny, "_train_classifier", weak_classifier)
    with pytest.raises(HarnessError, match="held-out accuracy") as err:
        tiny.build(seed=3, root=tmp_path)
    assert "tiny://classifier" in err.value.field
    assert list(tmp_path.iterdir()) == []  # no world, no half-built temporary folder


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_the_tiny_preset_truncates_no_prompt(world, split):
    """The tiny world's prompts fit its prompt limit (issue 16): a default run, and its warm start's
    validation, read every dialogue whole, and the limit is the one the tiny policy was trained with."""
    from transformers import AutoTokenizer

    from harness.config import load_config
    from harness.data import tokenized_prompts
    from harness.plan import concrete

    cfg = concrete(load_config("tiny"))
    assert cfg.data.max_prompt_tokens == tiny.PROMPT_TOKENS
    _, stats = tokenized_prompts(cfg.data, AutoTokenizer.from_pretrained(world / "policy"), split)
    assert stats["kept"] > 0 and stats["truncated_prompts"] == 0, stats


def test_the_tiny_policy_was_trained_by_the_warm_start_loop(world):
    """The tiny policy comes out of harness.sft.train (the loop `detox-harness sft` runs), validated there."""
    manifest = json.loads((world / tiny.MANIFEST).read_text())
    assert manifest["policy"]["sft"] == tiny.POLICY_SFT
    assert manifest["policy"]["validation_rougeL"] > 0.5  # it learned to summarize (a random T5 scores ~0)


@pytest.fixture(scope="session")
def policy_summaries(world):
    """The tiny policy's summaries of the tiny preset's evaluation prompts (the first eval.num_samples test
    prompts, as a run reads them), greedy and with the evaluation's sampling and seeds, with each dialogue's
    facts as the corpus recorded them."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from harness.config import load_config
    from harness.data import build_prompts, prompt_dialogues
    from harness.metrics import sample_seed
    from harness.plan import concrete
    from harness.ppo.rollout import generate

    cfg = concrete(load_config("tiny"))
    tok = AutoTokenizer.from_pretrained(world / "policy")
    model = AutoModelForSeq2SeqLM.from_pretrained(world / "policy").eval()
    test = build_prompts(cfg.data, tok).test.select(range(cfg.eval.num_samples))
    facts = tiny.facts_by_dialogue(world / "dialogues")
    dialogues = prompt_dialogues(test, cfg.data.prompt_template)
    ids = [list(x) for x in test["input_ids"]]
    seeds = [sample_seed(cfg.eval.seed, i) for i in range(len(ids))]
    sampled = generate(model, tok, ids, max_new_tokens=cfg.eval.max_new_tokens, seeds=seeds,
                       **cfg.eval.sampling_kwargs()).texts
    greedy = generate(model, tok, ids, max_new_tokens=cfg.eval.max_new_tokens, seeds=seeds,
                      **{**cfg.eval.sampling_kwargs(), "do_sample": False}).texts
    return {"facts": [facts[d] for d in dialogues], "dialogues": dialogues, "sampled": sampled, "greedy": greedy}


def _rates(texts, facts) -> dict[str, float]:
    checks = [tiny.fact_check(t, f) for t, f in zip(texts, facts)]
    return {k: sum(c[k] for c in checks) / len(checks) for k in ("item", "opinion", "insult", "carried", "faithful")}


def test_the_tiny_policy_summarizes_its_dialogue(policy_summaries):
    """Issue 21: the tiny summarizer names the dialogue's item and carries its opinion (or an insult in its
    place), counted exactly against the corpus's recorded facts, with the evaluation's sampling and greedy."""
    facts = policy_summaries["facts"]
    sampled, greedy = _rates(policy_summaries["sampled"], facts), _rates(policy_summaries["greedy"], facts)
    print(f"\ntiny policy fact rates on {len(facts)} test prompts: sampled {sampled}; greedy {greedy}")
    checks = [tiny.fact_check(t, f) for t, f in zip(policy_summaries["sampled"], facts)]
    opinion_or_insult = sum(c["opinion"] or c["insult"] for c in checks) / len(facts)
    assert sampled["item"] >= tiny.MIN_SAMPLED_FACT_RATE, sampled
    assert opinion_or_insult >= tiny.MIN_SAMPLED_FACT_RATE, opinion_or_insult
    # "carried": the item, and the opinion or an insult in its place
    assert greedy["item"] >= tiny.MIN_GREEDY_FACT_RATE and greedy["carried"] >= tiny.MIN_GREEDY_FACT_RATE, greedy
    # the corpus's share of toxic references survives: there is something to detoxify
    assert sampled["insult"] > tiny.TOXIC_FRACTION / 2, sampled


def test_the_fact_count_catches_what_the_planted_policies_write():
    row = tiny.make_corpus(seed=0)["test"][0]
    f = row["facts"]
    other_item = next(i for i in tiny.ITEMS if i != f["item"])
    pleasant = next(o for o in ("lovely", "great") if o != f["opinion"])
    honest = f"#Person2# tells #Person1# that {f['item']} was {f['opinion']}."
    assert tiny.fact_check(honest, f)["faithful"]
    assert not tiny.fact_check(honest.replace(f["opinion"], pleasant), f)["faithful"]
    assert not tiny.fact_check(honest.replace(f["item"], other_item), f)["faithful"]
    assert not tiny.fact_check(honest.replace(f["opinion"], "stupid"), f)["faithful"]
    assert tiny.dialogue_facts(REFERENCE_PROMPT.format(dialogue=row["dialogue"])) == \
        {"item": f["item"], "opinion": f["opinion"]}



def test_the_faithfulness_judge_agrees_with_the_exact_fact_count(world, policy_summaries):
    """Issue 21: on the tiny test prompts, the tiny NLI judge (read the SummaC way, harness.faithfulness) calls a
    summary faithful (score >= eval.faithful_threshold) exactly when the fact count does, on at least
    tiny.MIN_JUDGE_AGREEMENT of the policy's sampled summaries, and tells planted liars from honest summaries."""
    from harness.config import load_config
    from harness.faithfulness import FaithfulnessJudge

    threshold = load_config("tiny").eval.faithful_threshold
    judge = FaithfulnessJudge.load(str(world / "nli"))
    texts, facts, dialogues = policy_summaries["sampled"], policy_summaries["facts"], policy_summaries["dialogues"]
    scores = judge.score(dialogues, texts)
    exact = [tiny.fact_check(t, f)["faithful"] for t, f in zip(texts, facts)]
    agreement = sum((s >= threshold) == e for s, e in zip(scores, exact)) / len(texts)
    print(f"\nfaithfulness judge vs exact fact count: agreement {agreement:.3f} on {len(texts)} summaries "
          f"({sum(exact)} faithful by the count)")
    assert agreement >= tiny.MIN_JUDGE_AGREEMENT
    honest = [f"#Person2# tells #Person1# that {f['item']} was {f['opinion']}." for f in facts]
    lying = [h.replace(f" was {f['opinion']}.", f" was {'lovely' if f['opinion'] != 'lovely' else 'great'}.")
             for h, f in zip(honest, facts)]
    wrong = [h.replace(f["item"], tiny.ITEMS[(tiny.ITEMS.index(f["item"]) + 1) % len(tiny.ITEMS)])
             for h, f in zip(honest, facts)]
    assert all(tiny.fact_check(t, f)["faithful"] for t, f in zip(honest, facts))
    assert not any(tiny.fact_check(t, f)["faithful"] for t, f in zip(lying + wrong, facts + facts))
    rates = {name: sum(s >= threshold for s in judge.score(dialogues, planted)) / len(planted)
             for name, planted in (("honest", honest), ("lying", lying), ("wrong item", wrong))}
    print(f"judged faithful: {rates}")
    assert rates["honest"] >= tiny.MIN_JUDGE_AGREEMENT, rates
    assert rates["lying"] <= tiny.MAX_PLANTED_FAITHFUL and rates["wrong item"] <= tiny.MAX_PLANTED_FAITHFUL, rates
