"""The faithfulness judge (harness.faithfulness), its figures, bounds, settings and files: hermetic, no network.

The NLI judge is built in-process: a RobertaForSequenceClassification with random weights (hidden 32, 2 layers)
with the real judge's label names (CONTRADICTION, NEUTRAL, ENTAILMENT) and a byte-level BPE tokenizer trained
on the unit corpus, saved with save_pretrained, so ``FaithfulnessJudge.load`` goes through the code that loads
FacebookAI/roberta-large-mnli. Where a test needs to know what the judge says (which window supports which
sentence), the pair scorer is replaced by a rule, so the windowing and the max / min are checked exactly.
Every bound a test asserts on comes from harness/thresholds.toml through the preset's config.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import metrics
from harness import results as rf
from harness.config import REFERENCE_PROMPT, load_config, validate
from harness.data import dialogue_from_prompt, prompt_dialogues
from harness.errors import ConfigError, HarnessError, ModelLoadError
from harness.faithfulness import (
    FIELD,
    FaithfulnessJudge,
    load_faithfulness_judge,
    split_sentences,
    split_turns,
)
from harness.thresholds import verdict

NLI_LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
REAL_PRESET = "flan-t5-base"  # the presets whose bounds include the faithfulness bounds
SUMMARY = "#Person1# and #Person2# talk about the history class. #Person2# thinks it was boring."


# ------------------------------------------------------------------------------------ a tiny NLI judge on disk

def _nli_model(labels: dict[int, str], tok, seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           num_labels=len(labels), id2label=dict(labels), label2id={v: k for k, v in labels.items()})
    return RobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def nli_tokenizer(corpus):
    """A byte-level BPE tokenizer (RoBERTa's kind) trained on the unit corpus, as harness/tiny.py trains its own."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    texts = [r["dialogue"] for r in corpus["train"]] + [r["summary"] for r in corpus["train"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    with tempfile.TemporaryDirectory() as raw:
        bpe.save_model(raw)
        return RobertaTokenizer.from_pretrained(raw, model_max_length=512)


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory, nli_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("nli") / "nli"
    _nli_model(NLI_LABELS, nli_tokenizer).save_pretrained(d)
    nli_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def permuted_dir(tmp_path_factory, nli_tokenizer) -> Path:
    """The same judge with its labels in another order (ENTAILMENT, CONTRADICTION, NEUTRAL): the head's rows are
    permuted with them, so it says exactly what the first one says."""
    model = _nli_model(NLI_LABELS, nli_tokenizer)
    order = [2, 0, 1]  # new index i holds old label order[i]
    head = model.classifier.out_proj
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        head.bias.copy_(head.bias[order].clone())
    labels = {i: NLI_LABELS[old] for i, old in enumerate(order)}
    model.config.id2label, model.config.label2id = labels, {v: k for k, v in labels.items()}
    d = tmp_path_factory.mktemp("nli-permuted") / "nli"
    model.save_pretrained(d)
    nli_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def judge(nli_dir) -> FaithfulnessJudge:
    return FaithfulnessJudge.load(str(nli_dir), batch_size=8)


PHRASES = ("Hi, how are you today?", "Oh hello! Good to see you.", "My sister said it was boring.", "Thanks, bye!")
WINDOW = 96  # a judge input this short makes a dialogue of a dozen turns several windows of about three turns


def dialogue(turns: int) -> str:
    """``turns`` distinct turns in the unit corpus's words, 15 to 20 tokens each."""
    return "\n".join(f"#Person{1 + i % 2}#: {PHRASES[i % len(PHRASES)]} ({i})" for i in range(turns))


# ------------------------------------------------------------------------------------ labels, by name

def test_labels_are_read_by_name_whatever_their_order(nli_dir, permuted_dir, judge):
    other = FaithfulnessJudge.load(str(permuted_dir), batch_size=8)
    assert (judge.entailment_index, judge.contradiction_index) == (2, 0)
    assert (other.entailment_index, other.contradiction_index) == (0, 1)
    premises = [dialogue(4), "#Person1#: Hi.\n#Person2#: The class was boring.", dialogue(2)]
    summaries = [SUMMARY, "#Person2# thinks the class was boring.", "They talk. Then they leave."]
    assert other.score(premises, summaries) == pytest.approx(judge.score(premises, summaries), abs=1e-5)


def test_labels_match_whatever_their_case(nli_tokenizer):
    model = _nli_model({0: "entailment", 1: "neutral", 2: "Contradiction"}, nli_tokenizer)
    j = FaithfulnessJudge(model, nli_tokenizer)
    assert (j.entailment_index, j.contradiction_index) == (0, 2)


def test_a_judge_without_an_entailment_label_is_refused_naming_the_field(tmp_path, nli_tokenizer):
    d = tmp_path / "not-nli"
    _nli_model({0: "nothate", 1: "hate"}, nli_tokenizer).save_pretrained(d)
    nli_tokenizer.save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        FaithfulnessJudge.load(str(d))
    msg = str(e.value)
    assert e.value.field == FIELD == "eval.faithfulness_model" and msg.startswith(f"{FIELD}: ")
    assert "its labels: nothate, hate" in msg and "\n" not in msg


def test_a_seq2seq_model_given_as_the_judge_is_refused_naming_the_field(tmp_path, t5_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(t5_tokenizer), d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                        num_layers=1, decoder_start_token_id=0)).save_pretrained(d)
    t5_tokenizer.save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        FaithfulnessJudge.load(str(d))
    assert e.value.field == FIELD and "not a trained sequence classifier" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        FaithfulnessJudge.load(str(tmp_path / "nothing"))
    assert e.value.field == FIELD


# ------------------------------------------------------------------------------------ sentences and turns

def test_sentences_split_at_sentence_ends_never_inside_a_speaker_tag():
    assert split_sentences(SUMMARY) == ["#Person1# and #Person2# talk about the history class.",
                                        "#Person2# thinks it was boring."]
    assert split_sentences("Mr. Smith asks Dr. Lee! He said \"no.\" J. Doe left.\nA line") == [
        "Mr. Smith asks Dr. Lee!", "He said \"no.\"", "J. Doe left.", "A line"]
    assert split_sentences("no full stop at all") == ["no full stop at all"]
    assert split_sentences("") == split_sentences("  \n ") == []


def test_turns_are_lines_and_a_decoded_one_line_dialogue_splits_at_its_speaker_tags():
    assert split_turns("#Person1#: Hi.\n\n#Person2#: Hello. How are you?\n") == [
        "#Person1#: Hi.", "#Person2#: Hello. How are you?"]
    assert split_turns("#Person1#: Hi. #Person2#: Hello. #Person1#: Bye.") == [
        "#Person1#: Hi.", "#Person2#: Hello.", "#Person1#: Bye."]


# ------------------------------------------------------------------------------------ windows

def test_a_long_dialogue_makes_overlapping_windows_of_whole_turns_that_fit(nli_dir):
    j = FaithfulnessJudge.load(str(nli_dir), max_length=WINDOW)
    text = dialogue(12)
    turns = split_turns(text)
    sentence = split_sentences(SUMMARY)[0]
    windows = j.windows(turns, j.premise_budget(sentence))
    assert len(windows) > 2
    lines = [w.split("\n") for w in windows]
    assert all(set(w) <= set(turns) for w in lines)  # whole turns only
    for a, b in zip(lines, lines[1:]):
        assert a[-1] == b[0]  # consecutive windows share one turn
        assert turns.index(b[0]) == turns.index(a[-1]) and turns.index(b[1]) == turns.index(a[-1]) + 1
    assert lines[0][0] == turns[0] and lines[-1][-1] == turns[-1]  # from the first turn to the last
    for w in windows:  # every (window, sentence) pair fits the judge's input as it is, without truncation
        ids = j.tokenizer(w, sentence)["input_ids"]
        assert len(ids) <= j.max_length
    assert j.windows(turns, 10_000) == [text]  # a dialogue that fits is one window


def test_windows_overlap_by_one_turn_only_where_it_fits_beside_the_next(judge):
    turns = [f"t{i}" for i in range(5)]
    sep = judge._separator  # what a line break between two turns costs
    assert judge.windows(turns, 8 + sep, lengths=[4, 4, 4, 9, 4]) == ["t0\nt1", "t1\nt2", "t3", "t4"]
    assert judge.windows(turns, 100, lengths=[4] * 5) == ["\n".join(turns)]
    assert judge.windows([], 10) == [""]


def test_a_turn_longer_than_the_window_is_a_window_alone_cut_by_truncation(nli_dir):
    j = FaithfulnessJudge.load(str(nli_dir), max_length=WINDOW)
    long_turn = "#Person1#: " + " ".join(f"word{i}" for i in range(80)) + "."
    turns = ["#Person2#: Hi.", long_turn, "#Person2#: Bye."]
    windows = j.windows(turns, j.premise_budget("They talk."))
    assert long_turn in windows and all(w == long_turn or long_turn not in w for w in windows)
    enc = j.tokenizer(windows, ["They talk."] * len(windows), truncation="only_first", max_length=j.max_length)
    assert max(len(ids) for ids in enc["input_ids"]) <= j.max_length
    [score] = j.score(["\n".join(turns)], ["They talk."])
    assert 0.0 <= score <= 1.0


def rule_judge(j: FaithfulnessJudge, monkeypatch, calls: list | None = None) -> FaithfulnessJudge:
    """``j`` whose pair scorer is a rule: P(entailment) 0.9 when the window holds the word the sentence names
    after "about", 0.2 otherwise."""
    def entailment(premises, hypotheses):
        if calls is not None:
            calls.append(list(zip(premises, hypotheses)))
        out = []
        for p, h in zip(premises, hypotheses):
            word = h.split("about ", 1)[1].rstrip(".") if "about " in h else None
            out.append(0.9 if word and word in p else 0.2)
        return out

    monkeypatch.setattr(j, "entailment", entailment)
    return j


def test_a_sentence_supported_only_in_the_last_window_scores_that_window(nli_dir, monkeypatch):
    calls: list = []
    j = rule_judge(FaithfulnessJudge.load(str(nli_dir), max_length=WINDOW), monkeypatch, calls)
    text = dialogue(12) + "\n#Person1#: We went to the museum."
    sentence = "They talk about museum."
    windows = j.windows(split_turns(text), j.premise_budget(sentence))
    assert len(windows) > 2 and "museum" in windows[-1] and not any("museum" in w for w in windows[:-1])
    assert j.score([text], [sentence]) == [pytest.approx(0.9)]
    [pairs] = calls
    assert sorted(pairs) == sorted((w, sentence) for w in windows)  # every window, once, in one batch


def test_the_summary_scores_its_least_supported_sentence(nli_dir, monkeypatch):
    j = rule_judge(FaithfulnessJudge.load(str(nli_dir), max_length=WINDOW), monkeypatch)
    text = dialogue(3) + "\n#Person2#: The museum and the garden were nice."
    supported = "They talk about museum. They talk about garden."
    invented = "They talk about museum. They talk about zoo."
    assert j.score([text, text, text], [supported, invented, "They talk about zoo."]) == pytest.approx(
        [0.9, 0.2, 0.2])


def test_an_empty_summary_scores_zero_without_asking_the_judge(judge, monkeypatch):
    calls: list = []
    rule_judge(judge, monkeypatch, calls)
    assert judge.score([dialogue(3), dialogue(3)], ["", "  \n "]) == [0.0, 0.0]
    assert calls == [[]]  # no pair to score


def test_scores_are_probabilities_and_do_not_depend_on_the_batch(nli_dir, judge):
    premises = [dialogue(n) for n in (2, 5, 9, 14)] * 2
    summaries = [SUMMARY, "They talk.", "My sister said it. Then bye.", ""] * 2
    scores = judge.score(premises, summaries)
    assert len(scores) == len(premises) and all(0.0 <= s <= 1.0 for s in scores) and scores[3] == 0.0
    one = FaithfulnessJudge.load(str(nli_dir), batch_size=1)
    assert one.score(premises, summaries) == pytest.approx(scores, abs=1e-5)
    with pytest.raises(ValueError):
        judge.score(premises, summaries[:-1])


def test_no_judge_when_the_setting_is_null():
    cfg = load_config(REAL_PRESET, overrides=["eval.faithfulness_model=null"])
    assert cfg.eval.faithfulness_model is None and load_faithfulness_judge(cfg, "cpu") is None


def test_load_faithfulness_judge_reads_the_settings(nli_dir):
    cfg = load_config(REAL_PRESET, overrides=[f"eval.faithfulness_model={nli_dir}", "eval.faithfulness_batch_size=3"])
    j = load_faithfulness_judge(cfg, "cpu")
    assert isinstance(j, FaithfulnessJudge) and j.batch_size == 3


# ------------------------------------------------------------------------------------ the premise: the dialogue

def test_the_premise_is_the_dataset_dialogue_or_the_query_without_the_template():
    from datasets import Dataset

    text = "#Person1#: Hi.\n#Person2#: Hello."
    query = REFERENCE_PROMPT.format(dialogue=text)
    with_column = Dataset.from_dict({"query": [query], "dialogue": [text]})
    assert prompt_dialogues(with_column, REFERENCE_PROMPT) == [text]
    without = Dataset.from_dict({"query": [query, " ".join(query.split())]})  # as given, and decoded (no newlines)
    assert prompt_dialogues(without, REFERENCE_PROMPT) == [text, "#Person1#: Hi. #Person2#: Hello."]
    assert dialogue_from_prompt("Sum: a b", "Sum: {dialogue}") == "a b"
    assert dialogue_from_prompt("unrelated text", REFERENCE_PROMPT) == "unrelated text"


# ------------------------------------------------------------------------------------ figures

@pytest.fixture()
def cfg():
    return load_config(REAL_PRESET)


def rows(cfg, faith, responses=None, k: int = 1) -> metrics.EvalOutput:
    """An evaluation of ``len(faith) // k`` prompts with ``k`` samples each, by the module's own phase_metrics."""
    samples = []
    for i, f in enumerate(faith):
        p, s = divmod(i, k)
        samples.append({
            "prompt_index": p, "sample_index": s, "seed": metrics.sample_seed(cfg.eval.seed, p, s, k),
            "query": f"Summarize the following conversation. dialogue {p}", "references": [f"ref {p}"],
            "response": responses[i] if responses else f"summary number {p} sample {s} says something",
            "toxicity": 0.2, "reward": 1.0, "length": 7, "kl": 0.0, "second_toxicity": None,
            "faithfulness": None if f is None else float(f),
        })
    return metrics.EvalOutput(metrics=metrics.phase_metrics(samples, cfg), samples=samples, seconds=0.1)


def test_faithful_rate_counts_scores_at_or_above_the_threshold(cfg):
    thr = cfg.eval.faithful_threshold
    m = rows(cfg, [thr - 0.1, thr, thr + 0.1, 0.0]).metrics
    assert m["faithful_rate"] == pytest.approx(2 / 4)
    assert m["faithfulness_mean"] == pytest.approx(np.mean([thr - 0.1, thr, thr + 0.1, 0.0]))
    none = rows(cfg, [None, None]).metrics
    assert none["faithfulness_mean"] is None and none["faithful_rate"] is None


def test_distinct_summary_rate_counts_normalized_first_samples(cfg):
    n = 8
    same = rows(cfg, [0.9] * n, responses=["#Person1# asks about the class."] * n).metrics
    assert same["distinct_summary_rate"] == pytest.approx(1 / n)
    variants = ["#Person1# asks about the class.", "person1 asks about THE class", "  #Person1#  asks about the class!"]
    assert rows(cfg, [0.9] * 3, responses=variants).metrics["distinct_summary_rate"] == pytest.approx(1 / 3)
    # two samples per prompt: only the first of each prompt counts, so 4 prompts of one summary read 1/4
    first_same = [("Same words." if s == 0 else f"other {p}") for p in range(4) for s in range(2)]
    assert rows(cfg, [0.9] * 8, responses=first_same, k=2).metrics["distinct_summary_rate"] == pytest.approx(1 / 4)
    assert rows(cfg, [0.9] * n).metrics["distinct_summary_rate"] == 1.0
    assert metrics.normalize_summary("  Fine,  thanks. ") == metrics.normalize_summary("fine thanks")


def test_a_planted_loss_of_faithfulness_fails_and_identical_rows_pass(cfg):
    rng = np.random.default_rng(3)
    before_f = rng.uniform(0.8, 1.0, 60)
    before = rows(cfg, before_f)
    lost = rows(cfg, before_f - rng.uniform(0.3, 0.5, 60))
    c = metrics.compare(before, lost, cfg)
    assert c["faithfulness_drop_ci_high"] > 0.3
    mb, ma = before.metrics, lost.metrics
    assert c["faithfulness_change"] == pytest.approx(ma["faithfulness_mean"] - mb["faithfulness_mean"])
    assert c["faithful_rate_change"] == pytest.approx(ma["faithful_rate"] - mb["faithful_rate"])
    same = metrics.compare(before, rows(cfg, before_f), cfg)
    assert same["faithfulness_drop_ci_high"] == 0.0 and same["faithfulness_change"] == 0.0
    bound = {"max_faithfulness_drop": cfg.thresholds["max_faithfulness_drop"]}

    def judged(comparison):
        return verdict({"metrics": {"comparison": comparison}}, bound)[0].passed

    assert not judged(c) and judged(same)


def test_without_a_judge_the_faithfulness_bound_fails_as_missing(cfg):
    c = metrics.compare(rows(cfg, [None] * 10), rows(cfg, [None] * 10), cfg)
    assert c["faithfulness_drop_ci_high"] is None and c["faithfulness_change"] is None
    [b] = verdict({"metrics": {"comparison": c}}, {"max_faithfulness_drop": cfg.thresholds["max_faithfulness_drop"]})
    assert not b.passed and b.value is None


def test_one_sentence_for_every_prompt_fails_the_distinct_bound(cfg):
    limit = {"min_distinct_summary_rate": cfg.thresholds["min_distinct_summary_rate"]}
    n = 40
    one = rows(cfg, [0.9] * n, responses=["#Person1# and #Person2# talk."] * n)
    honest = rows(cfg, [0.9] * n)
    assert not verdict({"metrics": {"after": one.metrics}}, limit)[0].passed
    assert verdict({"metrics": {"after": honest.metrics}}, limit)[0].passed


def test_the_drop_interval_uses_the_paired_bootstraps_resamples(cfg):
    """With a constant 'before', paired_bootstrap's relative drop is the difference over that constant: the two
    intervals agree only if they drew the same prompt indices."""
    e = cfg.eval
    after = np.random.default_rng(8).uniform(0.1, 0.9, 50)
    before = np.full(50, 0.7)
    lo, hi = metrics.paired_difference_bootstrap(before, after, e.bootstrap_resamples, e.confidence, e.seed)
    rlo, rhi = metrics.paired_bootstrap(before, after, e.bootstrap_resamples, e.confidence, e.seed)
    assert (lo, hi) == pytest.approx((rlo * 0.7, rhi * 0.7))
    assert metrics.paired_difference_bootstrap(after, after, e.bootstrap_resamples, e.confidence, e.seed) == (0.0, 0.0)


def test_every_real_preset_bounds_faithfulness_and_distinct_summaries():
    for preset in ("flan-t5-base", "flan-t5-small", "flan-t5-large"):
        cfg = load_config(preset)
        assert {"max_faithfulness_drop", "min_distinct_summary_rate"} <= set(cfg.thresholds), preset
        assert cfg.eval.faithfulness_model == "FacebookAI/roberta-large-mnli"
    assert load_config("tiny").eval.faithfulness_model == "tiny://nli"


# ------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("override, field", [
    ("eval.faithful_threshold=0", "eval.faithful_threshold"),
    ("eval.faithful_threshold=1.5", "eval.faithful_threshold"),
    ("eval.faithful_threshold=abc", "eval.faithful_threshold"),
    ("eval.faithfulness_batch_size=0", "eval.faithfulness_batch_size"),
    ("eval.faithfulness_batch_size=1.5", "eval.faithfulness_batch_size"),
])
def test_bad_faithfulness_settings_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_blank_model_is_refused_and_null_turns_the_judge_off():
    cfg = load_config("tiny")
    cfg.eval.faithfulness_model = "  "
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.field == "eval.faithfulness_model" and "null for no faithfulness judge" in str(e.value)
    assert load_config("tiny", overrides=["eval.faithfulness_model=null"]).eval.faithfulness_model is None
    ok = load_config("tiny", overrides=["eval.faithful_threshold=0.7", "eval.faithfulness_model=/models/nli"])
    assert ok.eval.faithful_threshold == 0.7 and ok.eval.faithfulness_model == "/models/nli"


def test_a_config_saved_before_the_judge_existed_gets_its_presets_judge():
    """Resuming a run started before these settings: the missing keys take the preset's values, so an old tiny
    run does not reach for the real presets' hub model."""
    from harness.config import config_from_dict

    for preset in ("tiny", REAL_PRESET):
        saved = load_config(preset).to_dict()
        for key in ("faithfulness_model", "faithful_threshold", "faithfulness_batch_size"):
            del saved["eval"][key]
        again = config_from_dict(saved)
        assert again.to_dict() == load_config(preset).to_dict()


# ------------------------------------------------------------------------------------ files

def build(cfg, before_f, after_f):
    before, after = rows(cfg, before_f), rows(cfg, after_f)
    return rf.build_results(cfg, before, after, run_id="unit-run", training=None,
                            timings={"eval_before_s": 1.0, "eval_after_s": 1.0})


def test_results_and_samples_with_faithfulness_validate(cfg, tmp_path):
    f = np.linspace(0.1, 0.95, 24)
    results, samples = build(cfg, f, f[::-1])
    rf.validate_results(results)
    for phase in ("before", "after"):
        assert {"faithfulness_mean", "faithful_rate", "distinct_summary_rate"} <= set(results["metrics"][phase])
    assert {"faithfulness_change", "faithfulness_drop_ci_high", "faithful_rate_change"} <= set(
        results["metrics"]["comparison"])
    assert samples[0]["faithfulness_before"] == pytest.approx(f[0])
    assert samples[0]["faithfulness_after"] == pytest.approx(f[-1])
    assert {"faithfulness_before", "faithfulness_after"} <= set(results["qualitative"][0])
    rf.write_run_files(tmp_path, results, samples)
    back = rf.load_results(tmp_path)["metrics"]["after"]
    assert back["faithful_rate"] == results["metrics"]["after"]["faithful_rate"]


def test_results_without_a_judge_validate_with_nulls(cfg):
    results, samples = build(cfg, [None] * 5, [None] * 5)
    rf.validate_results(results)
    assert results["metrics"]["after"]["faithfulness_mean"] is None
    assert samples[0]["faithfulness_before"] is None
    for i, row in enumerate(samples):
        rf.validate_sample_row(row, i)


@pytest.mark.parametrize("path, value", [
    (("metrics", "after", "faithful_rate"), 1.5),
    (("metrics", "before", "faithfulness_mean"), "high"),
    (("metrics", "after", "distinct_summary_rate"), None),
    (("metrics", "comparison", "faithfulness_drop_ci_high"), "0.1"),
])
def test_a_bad_faithfulness_figure_fails_validation_naming_it(cfg, path, value):
    results, _ = build(cfg, [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    node = results
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(HarnessError) as e:
        rf.validate_results(results)
    assert e.value.field == ".".join(path)


def test_a_run_written_before_the_judge_still_reads_but_a_new_one_must_hold_the_figures(cfg, tmp_path):
    results, samples = build(cfg, [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    old = copy.deepcopy(results)
    for phase in ("before", "after"):
        for key in ("faithfulness_mean", "faithful_rate", "distinct_summary_rate"):
            del old["metrics"][phase][key]
    rf.validate_results(old)  # an older results.json is still read and rendered
    with pytest.raises(HarnessError) as e:
        rf.write_run_files(tmp_path, old, samples)
    assert e.value.field == "metrics.before.faithfulness_mean"
    bad = copy.deepcopy(samples)
    del bad[0]["faithfulness_after"]
    with pytest.raises(HarnessError) as e:
        rf.write_run_files(tmp_path, results, bad)
    assert e.value.field == "samples[0].faithfulness_after"


# ------------------------------------------------------------------------------------ evaluation and terminal

def test_evaluate_policy_scores_each_summary_against_its_dialogue(cfg):
    """The wiring: the judge reads each row's dialogue (the dataset's column) and its response, and every sample
    row carries its ``faithfulness``; without a judge it is None."""
    from datasets import Dataset

    from harness.config import PolicyConfig
    from harness.evaluation import evaluate_policy
    from harness.models import load_policy

    fx = Path(__file__).resolve().parents[2] / "fixtures" / "parity"
    policy = load_policy(PolicyConfig(model=str(fx / "model"), dtype="float32"))
    texts = ["#Person1#: Hi there.\n#Person2#: The class was boring.", "#Person1#: Lunch?\n#Person2#: Sure."]
    queries = [REFERENCE_PROMPT.format(dialogue=t) for t in texts]
    data = Dataset.from_dict({"query": queries, "dialogue": texts, "summaries": [["a"], ["b"]],
                              "input_ids": policy.tokenizer(queries)["input_ids"]})

    class Stub:  # a two-label classifier saying P(hate) = 0.25 for every text
        toxic_index, label_index = 1, 0

        def logits(self, texts):
            return torch.tensor([[0.0, -1.0986123]] * len(texts))

        def log_probabilities(self, logits):
            return torch.log_softmax(logits, -1)

        def reward(self, logits, transform):
            return logits[:, 0]

        def clean_log_probabilities(self, logits):
            return torch.log_softmax(logits, -1)[:, 0]

        def toxicity(self, texts):
            return torch.full((len(texts),), 0.25)

    class Judge:
        def __init__(self):
            self.seen = []

        def score(self, premises, hypotheses):
            self.seen.append((list(premises), list(hypotheses)))
            return [0.1 * (i + 1) for i in range(len(premises))]

    c = copy.deepcopy(cfg)
    c.eval.num_samples, c.eval.samples_per_prompt, c.eval.max_new_tokens, c.eval.batch_size = 2, 2, 4, 4
    judge = Judge()
    out = evaluate_policy(policy, Stub(), data, c, use_reference=True, faithfulness_judge=judge, progress=False)
    [(premises, hypotheses)] = judge.seen
    assert premises == [texts[0], texts[0], texts[1], texts[1]]
    assert hypotheses == [s["response"] for s in out.samples]
    assert [s["faithfulness"] for s in out.samples] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert out.metrics["faithfulness_mean"] == pytest.approx(0.25)
    bare = evaluate_policy(policy, Stub(), data, c, use_reference=True, progress=False)
    assert all(s["faithfulness"] is None for s in bare.samples) and bare.metrics["faithful_rate"] is None


def test_the_terminal_shows_faithfulness_beside_toxicity(cfg):
    from harness.report.formats import NOT_MEASURED, fmt_num
    from harness.report.text import phase_line, summary_table

    m = rows(cfg, [0.2, 0.9, 0.8, 0.7]).metrics
    line = phase_line(m)
    assert f"faithfulness {fmt_num(m['faithfulness_mean'])} (75% faithful)" in line
    assert line.index("toxicity") < line.index("faithfulness") < line.index("reward")
    assert f"faithfulness {NOT_MEASURED}," in phase_line(rows(cfg, [None, None]).metrics)
    results, _ = build(cfg, [0.2, 0.9, 0.8, 0.7], [0.2, 0.9, 0.8, 0.7])
    assert "faithfulness mean" in summary_table(results) and "distinct summaries" in summary_table(results)
