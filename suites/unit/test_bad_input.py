"""Bad input gets a clear error (issue 7, part 1): one test per bad input.

Every case asserts the project's exception type, the field it names (``e.value.field``, also the start of
the message) and that the message is one line. Config cases already covered by ``test_config.py``
(unknown keys, batch size not divisible, zero/negative learning rate, mini-batch 0, max == min new tokens)
are not repeated here. Models are the parity fixtures (a tiny T5 + LoRA) and classifiers built in-process:
the unit suite stays hermetic and needs neither the tiny world nor the network.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from harness.config import DataConfig, PolicyConfig, load_config
from harness.data import build_prompts, normalize
from harness.errors import ConfigError, DataError, HarnessError, ModelLoadError

REPO = Path(__file__).resolve().parents[2]
FX = REPO / "fixtures" / "parity"


def one_line(e: pytest.ExceptionInfo, field: str) -> str:
    msg = str(e.value)
    assert isinstance(e.value, HarnessError)
    assert e.value.field == field, msg
    assert msg.startswith(f"{field}: "), msg
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


# ============================================================================================ data

def test_missing_dialogue_column_lists_the_columns_found(tmp_path, t5_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello " * 50, "summary": "s", "topic": "t"}] * 5)
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "'dialogue'" in msg and "found columns: text, summary, topic" in msg


def test_missing_summary_column_lists_the_columns_found(tmp_path, t5_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "hello " * 50, "abstract": "s"}] * 5)
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "'summary'" in msg and "found columns: dialogue, abstract" in msg


@pytest.mark.parametrize("bad,shown", [(5, "5"), (None, "None"), (["a", "b"], "a list"), ({"x": 1}, "a dict"),
                                       (3.5, "3.5"), (True, "True")])
def test_non_string_dialogue(tmp_path, corpus, t5_tokenizer, bad, shown):
    rows = [dict(r) for r in corpus["train"][:20]]
    rows[7] = {**rows[7], "dialogue": bad}
    with pytest.raises(DataError) as e:
        normalize(rows, source="dialogues.jsonl")
    msg = one_line(e, "data.path")
    assert "row 7" in msg and f"id {rows[7]['id']}" in msg and "'dialogue'" in msg and "not text" in msg
    assert shown in msg and "dialogues.jsonl" in msg


def test_non_string_dialogue_in_a_file(tmp_path, corpus, t5_tokenizer):
    rows = [dict(r) for r in corpus["train"][:20]]
    rows[3]["dialogue"] = 12345
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "row 3" in msg and "not text" in msg and str(f) in msg


@pytest.mark.parametrize("empty", ["", "   ", "\n\t \n", "\u3000\u2003"])  # unicode spaces are empty too
def test_empty_dialogue(tmp_path, corpus, t5_tokenizer, empty):
    rows = [dict(r) for r in corpus["train"][:20]]
    rows[11]["dialogue"] = empty
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "row 11" in msg and "'dialogue' is empty" in msg


def test_dialogues_the_tokenizer_cannot_represent_are_counted_and_warned_about(tmp_path, corpus, t5_tokenizer,
                                                                               caplog):
    # emoji and CJK vanish into unknown tokens with the fixture tokenizer (a small SentencePiece model)
    rows = [dict(r) for r in corpus["train"][:40]]
    alien = {3: "#Person1#: " + "\U0001F600\U0001F621\U0001F92C\U0001F4A9 " * 30,
             7: "#Person1#: " + "\u4f60\u597d\uff0c\u4eca\u5929\u600e\u4e48\u6837\uff1f " * 30,
             11: "\U0001F600" * 250}
    for i, text in alien.items():
        rows[i]["dialogue"] = text
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level("WARNING", logger="harness.data"):
        data = build_prompts(data_cfg(path, min_chars=50, max_chars=5000), t5_tokenizer)
    assert data.stats["unknown_token_dialogues"] == len(alien)
    assert f"{len(alien)} of {data.stats['kept']} dialogues are mostly characters" in caplog.text
    # and the clean corpus raises no such warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="harness.data"):
        clean = build_prompts(data_cfg(write_jsonl(tmp_path / "clean.jsonl", corpus["train"][:40]), min_chars=50,
                                       max_chars=5000), t5_tokenizer)
    assert clean.stats["unknown_token_dialogues"] == 0 and "cannot represent" not in caplog.text


def test_every_row_removed_by_the_length_filter_names_the_bounds(corpus_dir, t5_tokenizer):
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(corpus_dir, min_chars=5000, max_chars=9000), t5_tokenizer)
    msg = one_line(e, "data.min_chars")
    assert "5000 < len(dialogue) < " in msg and "9000" in msg and "data.max_chars" in msg
    assert "their lengths:" in msg  # what the data holds, so the user can choose bounds


def test_split_too_small_for_one_batch(corpus_dir, t5_tokenizer):
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(corpus_dir, max_rows=20), t5_tokenizer, min_train_rows=32)
    msg = one_line(e, "ppo.batch_size")
    assert "fewer than one batch of 32" in msg


def test_test_split_too_small_for_the_evaluation(corpus_dir, t5_tokenizer):
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(corpus_dir, max_rows=20), t5_tokenizer, min_test_rows=100)
    msg = one_line(e, "eval.num_samples")
    assert "100" in msg


def test_a_fraction_that_leaves_a_split_empty(tmp_path, corpus, t5_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", corpus["train"][:3])
    with pytest.raises(DataError) as e:  # ceil(0.9 x 3) = 3 test rows: nothing left to train on
        build_prompts(data_cfg(f, min_chars=0, max_chars=100_000, test_fraction=0.9), t5_tokenizer)
    one_line(e, "data.test_fraction")


def test_a_file_without_rows(tmp_path, t5_tokenizer):
    f = tmp_path / "d.csv"
    f.write_text("id,dialogue,summary,topic\n")
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    one_line(e, "data.path")


@pytest.mark.parametrize("name,content,words", [
    ("broken.jsonl", '{"dialogue": "hi", "summary": "s"}\n{"dialogue": "oops"\n', "cannot read the file"),
    ("broken.json", '[{"dialogue": "hi", "summary": "s"}, ', "cannot read the file"),
    ("binary.jsonl", bytes(range(256)) * 8, "cannot read the file"),
    ("quote.csv", 'dialogue,summary\n"never closed,s\n', "cannot read the file"),
    ("empty.jsonl", "", "the file is empty"),
    ("blank.csv", "\n\n  \n", "the file is empty"),
    ("notes.txt", "dialogue: hi", "unsupported file type"),
])
def test_unreadable_file(tmp_path, t5_tokenizer, name, content, words):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert words in msg and str(f) in msg


def test_unreadable_file_names_the_parser_problem(tmp_path, t5_tokenizer):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"dialogue": "hi", "summary": "s"}\n{"dialogue": "oops"\n')
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    # the parser's own words, not datasets' "An error occurred while generating the dataset"
    assert "generating the dataset" not in str(e.value)
    assert "position" in str(e.value) or "JSON" in str(e.value)
    assert "line 2" in str(e.value)  # where the file is broken


@pytest.mark.parametrize("name,content", [
    ("columns.json", {"dialogue": ["a", "b"], "summary": ["s", "t"]}),  # a mapping of columns
    ("records.json", [{"dialogue": "a", "summary": "s"}, {"dialogue": "b", "summary": "t"}]),
    ("lines.json", None),  # JSON lines in a .json file
])
def test_json_layouts_read_as_records(tmp_path, name, content):
    from harness.data import load_rows

    f = tmp_path / name
    if content is None:
        f.write_text('{"dialogue": "a", "summary": "s"}\n{"dialogue": "b", "summary": "t"}\n')
    else:
        f.write_text(json.dumps(content))
    rows = normalize(load_rows(str(f)))
    assert [(r["dialogue"], r["summaries"]) for r in rows] == [("a", ["s"]), ("b", ["t"])]


@pytest.mark.parametrize("content,words", [('"just a string"', "list of records"),
                                           ('{"a": [1], "b": [1, 2]}', "list of records"),
                                           ("[" * 100_000, "nested too deeply")])
def test_json_that_holds_no_records(tmp_path, t5_tokenizer, content, words):
    f = tmp_path / "d.json"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(f), t5_tokenizer)
    assert words in one_line(e, "data.path")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(tmp_path, corpus, t5_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", corpus["train"][:20])
    f.chmod(0)
    try:
        with pytest.raises(DataError) as e:
            build_prompts(data_cfg(f), t5_tokenizer)
    finally:
        f.chmod(0o600)
    msg = one_line(e, "data.path")
    assert "ermission" in msg


def test_missing_file_or_directory(tmp_path, t5_tokenizer):
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(tmp_path / "nowhere" / "d.jsonl"), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "does not exist" in msg


def test_directory_without_data_files(tmp_path, t5_tokenizer):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(DataError) as e:
        build_prompts(data_cfg(tmp_path), t5_tokenizer)
    one_line(e, "data.path")


def test_rows_that_are_not_records():
    with pytest.raises(DataError) as e:
        normalize([{"dialogue": "a", "summary": "b"}, ["not", "a", "record"]])
    one_line(e, "data.path")


# ============================================================================================ models

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A complete adapter written by the harness (peft adapter + value head + tokenizer) on the parity T5."""
    from harness.models import load_policy

    policy = load_policy(PolicyConfig(model=str(FX / "model"), adapter=str(FX / "adapter"), dtype="float32"))
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    policy.save_pretrained(d)
    return d


def policy_cfg(**kw) -> PolicyConfig:
    return PolicyConfig(model=str(FX / "model"), dtype="float32", **kw)


def broken_copy(adapter_dir: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(adapter_dir, d)
    return d


def test_the_adapter_fixture_loads(adapter_dir):
    from harness.models import load_policy

    load_policy(policy_cfg(adapter=str(adapter_dir)))


def test_adapter_directory_missing(tmp_path):
    from harness.models import load_policy

    with pytest.raises(ModelLoadError) as e:
        load_policy(policy_cfg(adapter=str(tmp_path / "no-adapter")))
    msg = one_line(e, "policy.adapter")
    assert "does not exist" in msg and "no-adapter" in msg


@pytest.mark.parametrize("damage,words", [
    ("no_config", "adapter_config.json is missing"),
    ("config_not_json", "adapter_config.json is corrupt"),
    ("config_a_list", "not a peft adapter config"),
    ("config_without_peft_type", "not a peft adapter config"),
    ("no_weights", "adapter weights are missing"),
    ("weights_garbage", "corrupt or truncated"),
    ("weights_truncated", "corrupt or truncated"),
    ("weights_empty", "corrupt or truncated"),
    ("value_head_garbage", "value head weights are corrupt"),
    ("value_head_other_shape", "value head does not fit"),
])
def test_adapter_directory_corrupt(adapter_dir, tmp_path, damage, words):
    import torch
    from safetensors.torch import save_file

    from harness.models import load_policy

    d = broken_copy(adapter_dir, tmp_path, damage)
    weights = d / "adapter_model.safetensors"
    if damage == "no_config":
        (d / "adapter_config.json").unlink()
    elif damage == "config_not_json":
        (d / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    elif damage == "config_a_list":
        (d / "adapter_config.json").write_text("[1, 2, 3]")
    elif damage == "config_without_peft_type":
        (d / "adapter_config.json").write_text('{"r": 4}')
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "weights_garbage":
        weights.write_bytes(b"\x00not safetensors at all" * 20)
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "weights_empty":
        weights.write_bytes(b"")
    elif damage == "value_head_garbage":
        (d / "value_head.safetensors").write_bytes(b"xx")
    elif damage == "value_head_other_shape":
        save_file({"summary.weight": torch.zeros(1, 7), "summary.bias": torch.zeros(1)},
                  str(d / "value_head.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_policy(policy_cfg(adapter=str(d)))
    msg = one_line(e, "policy.adapter")
    assert words in msg, msg


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A T5 with another width than the parity model, with the parity tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    fx = json.loads((FX / "model" / "config.json").read_text())
    cfg = T5Config(vocab_size=fx["vocab_size"], d_model=fx["d_model"] + 8, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    d = tmp_path_factory.mktemp("other-base") / "other-t5"
    T5ForConditionalGeneration(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(FX / "model").save_pretrained(d)
    return d


def test_adapter_whose_base_model_does_not_match(adapter_dir, other_base):
    from harness.models import load_policy

    with pytest.raises(ModelLoadError) as e:
        load_policy(PolicyConfig(model=str(other_base), adapter=str(adapter_dir), dtype="float32"))
    msg = one_line(e, "policy.adapter")
    assert "does not fit the base model" in msg and "size mismatch" in msg
    assert str(other_base) in msg and "policy.model" in msg  # what was given, and the setting to change


def test_adapter_for_modules_the_base_lacks(tmp_path, adapter_dir):
    from harness.models import load_policy

    d = broken_copy(adapter_dir, tmp_path, "wrong-targets")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["not_a_module"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_policy(policy_cfg(adapter=str(d)))
    one_line(e, "policy.adapter")


@pytest.mark.parametrize("damage,words", [
    ("missing", "does not exist"),
    ("empty_dir", "not a complete seq2seq model"),
    ("config_not_json", "not a complete seq2seq model"),
    ("weights_garbage", "corrupt or truncated"),
])
def test_policy_model_directory_missing_or_corrupt(tmp_path, damage, words):
    from harness.models import load_policy

    d = tmp_path / "model"
    if damage != "missing":
        d.mkdir()
    if damage in ("config_not_json", "weights_garbage"):
        shutil.rmtree(d)
        shutil.copytree(FX / "model", d)
    if damage == "config_not_json":
        (d / "config.json").write_text("{")
    if damage == "weights_garbage":
        (d / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(ModelLoadError) as e:
        load_policy(PolicyConfig(model=str(d), dtype="float32"))
    msg = one_line(e, "policy.model")
    assert words in msg, msg


def test_policy_that_is_not_an_encoder_decoder(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from harness.models import load_policy

    d = tmp_path / "gpt"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(d)
    AutoTokenizer.from_pretrained(FX / "model").save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        load_policy(PolicyConfig(model=str(d), dtype="float32"))
    one_line(e, "policy.model")


def test_a_partial_policy_checkpoint_is_said_in_one_line(tmp_path, caplog):
    # transformers' MISSING table is kept off the terminal while models load; the harness says it instead
    from safetensors.torch import load_file, save_file

    from harness.models import load_policy

    d = tmp_path / "partial"
    shutil.copytree(FX / "model", d)
    weights = load_file(str(d / "model.safetensors"))
    dropped = sorted(k for k in weights if "decoder" in k and "layer_norm" in k)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="harness.models"):
        load_policy(PolicyConfig(model=str(d), dtype="float32", lora_target_modules=["q", "v"]))
    warned = [r.getMessage() for r in caplog.records if r.name == "harness.models"]
    assert len(warned) == 1 and "policy.model: 1 weights were not in the checkpoint" in warned[0]
    assert dropped in warned[0]


def test_lora_target_modules_the_model_lacks():
    from harness.models import load_policy

    with pytest.raises(ModelLoadError) as e:
        load_policy(policy_cfg(lora_target_modules=["query_proj"]))
    msg = one_line(e, "policy.lora_target_modules")
    assert "query_proj" in msg


def tiny_classifier(labels: dict[int, str] | None = None):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    labels = labels or {0: "nothate", 1: "hate"}
    cfg = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=40, num_labels=len(labels),
                        id2label=labels, label2id={v: k for k, v in labels.items()})
    return RobertaForSequenceClassification(cfg)


@pytest.mark.parametrize("kw,field,missing", [
    ({"label": "non-toxic"}, "reward.label", "non-toxic"),
    ({"toxic_label": "toxic"}, "reward.toxic_label", "toxic"),
])
def test_reward_label_the_classifier_does_not_have(kw, field, missing):
    from harness.toxicity import Classifier

    with pytest.raises(ModelLoadError) as e:
        Classifier(tiny_classifier(), None, **kw)
    msg = one_line(e, field)
    assert f"'{missing}'" in msg and "its labels: nothate, hate" in msg


def test_reward_label_in_the_wrong_case_suggests_the_right_one():
    from harness.toxicity import Classifier

    with pytest.raises(ModelLoadError) as e:
        Classifier(tiny_classifier(), None, label="NotHate")
    assert "did you mean 'nothate'" in one_line(e, "reward.label")


def test_a_reward_max_length_past_the_classifiers_positions_is_refused_before_loading(tmp_path):
    """``reward.max_length`` 39 on a RoBERTa of 40 position embeddings (it reads 38 tokens: 2 keep its padding
    offset) would index past them at the first reward: refused from config.json before any weights load, and
    by the classifier itself when it loads (a hub model not in the cache is read then); 38 fits."""
    from harness.judges import check_judges
    from harness.toxicity import Classifier

    d = tmp_path / "clf"
    tiny_classifier().save_pretrained(d)
    cfg = load_config("tiny", overrides=[f"reward.model={d}", "reward.max_length=39", "eval.second_classifier=null",
                                         "eval.faithfulness_model=null"])
    with pytest.raises(ConfigError) as e:
        check_judges(cfg)
    msg = one_line(e, "reward.max_length")
    assert "got 39" in msg and "reads at most 38 tokens" in msg and "give reward.max_length=38 or less" in msg
    with pytest.raises(ConfigError) as e:
        Classifier(tiny_classifier(), None, max_length=39)
    assert "reads at most 38 tokens" in one_line(e, "reward.max_length")
    cfg.reward.max_length = 38
    check_judges(cfg)
    assert Classifier(tiny_classifier(), None, max_length=38).max_length == 38
    assert Classifier(tiny_classifier(), None).max_length == 38  # unset: the model's own limit


def test_classifier_without_label_names(tmp_path, t5_tokenizer):
    """A classifier saved without names (LABEL_0, LABEL_1), through Classifier.load from a directory."""
    from harness.toxicity import Classifier

    d = tmp_path / "clf"
    tiny_classifier({0: "LABEL_0", 1: "LABEL_1"}).save_pretrained(d)
    t5_tokenizer.save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        Classifier.load(str(d), label="nothate")
    assert "its labels: LABEL_0, LABEL_1" in one_line(e, "reward.label")


def test_second_classifier_errors_name_its_own_settings(tmp_path, t5_tokenizer):
    from harness.toxicity import Classifier

    d = tmp_path / "clf"
    tiny_classifier().save_pretrained(d)
    t5_tokenizer.save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        Classifier.load(str(d), label="toxic", toxic_label="toxic", field="eval.second_classifier")
    one_line(e, "eval.second_toxic_label")
    with pytest.raises(ModelLoadError) as e:
        Classifier.load(str(tmp_path / "nothing"), field="eval.second_classifier")
    one_line(e, "eval.second_classifier")


@pytest.mark.parametrize("field", ["reward", "eval.second_classifier"])
def test_a_seq2seq_model_given_as_a_classifier_is_refused_not_trained_with_a_random_head(tmp_path, t5_tokenizer,
                                                                                         field, caplog):
    # transformers loads a T5 directory as T5ForSequenceClassification with a random head and a MISSING
    # table; following the label hint would train against noise. One line naming the field instead.
    from transformers import T5Config, T5ForConditionalGeneration

    from harness.toxicity import Classifier

    d = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(t5_tokenizer), d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                        num_layers=1, decoder_start_token_id=0)).save_pretrained(d)
    t5_tokenizer.save_pretrained(d)
    with pytest.raises(ModelLoadError) as e:
        Classifier.load(str(d), field=field)
    msg = one_line(e, "reward.model" if field == "reward" else "eval.second_classifier")
    assert "not a trained sequence classifier" in msg and "classification_head" in msg
    assert "MISSING" not in caplog.text


def test_classifier_directory_corrupt(tmp_path, t5_tokenizer):
    from harness.toxicity import Classifier

    d = tmp_path / "clf"
    tiny_classifier().save_pretrained(d)
    t5_tokenizer.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(ModelLoadError) as e:
        Classifier.load(str(d))
    assert "corrupt or truncated" in one_line(e, "reward.model")


def test_model_id_not_found_offline_says_how_to_give_a_local_path(monkeypatch):
    """HF_HUB_OFFLINE=1, even set after the Hub libraries were imported: fails at once, naming the field."""
    from harness.models import load_policy
    from harness.toxicity import Classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_policy(PolicyConfig(model="no-such-org/no-such-model"))
    msg = one_line(e, "policy.model")
    assert "local" in msg and "policy.model=DIR" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ModelLoadError) as e:
        Classifier.load("no-such-org/no-such-model")
    msg = one_line(e, "reward.model")
    assert "local" in msg and "reward.model=DIR" in msg


def test_dataset_id_not_found_offline_says_how_to_give_a_local_path(monkeypatch, t5_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        build_prompts(DataConfig(path="no-such-org/no-such-data"), t5_tokenizer)
    msg = one_line(e, "data.path")
    assert "local" in msg and "HF_HUB_OFFLINE" in msg


# ============================================================================================ config
# (test_config.py has: unknown keys with suggestions, removed keys, overrides that do not parse as their
# field's type, ppo.batch_size=30 not divisible, learning_rate 0 and negative, mini_batch_size 0,
# rollout.length_max == length_min, the sampling fields of rollout and eval, eval.num_samples 0, ...)

@pytest.mark.parametrize("override,field", [
    ("rollout.length_min=48", "rollout.length_max"),  # min == max (tiny preset: max 48)
    ("rollout.length_min=60", "rollout.length_max"),  # min > max
    ("rollout.length_max=10", "rollout.length_max"),  # max < min (tiny preset: min 32)
])
def test_length_sampler_with_min_at_or_above_max(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    msg = one_line(e, field)
    assert "rollout.length_min" in msg and "[length_min, length_max)" in msg


def test_length_sampler_min_above_max_in_a_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  length_min: 200\n  length_max: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    one_line(e, "rollout.length_max")


def test_eval_min_new_tokens_above_max():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=["eval.min_new_tokens=100", "eval.max_new_tokens=10"])
    one_line(e, "eval.min_new_tokens")


@pytest.mark.parametrize("override", [
    # sizes
    "ppo.batch_size=0", "ppo.batch_size=-8", "ppo.mini_batch_size=-4", "ppo.gradient_accumulation_steps=0",
    "ppo.ppo_epochs=0", "ppo.steps=0", "ppo.steps=-1", "ppo.max_bad_steps=0", "ppo.checkpoint_every=-1",
    "reward.batch_size=0", "reward.max_length=0", "eval.batch_size=-1", "eval.samples_per_prompt=0",
    "eval.max_new_tokens=0", "eval.bootstrap_resamples=0", "rollout.length_min=0", "policy.lora_r=0",
    "policy.lora_alpha=-16", "data.max_rows=0", "data.max_prompt_tokens=-1", "data.min_chars=-1",
    # rates and other positive numbers
    "ppo.learning_rate=-0.0", "ppo.init_kl_coef=-0.1", "ppo.target=0", "ppo.horizon=-1", "ppo.cliprange=0",
    "ppo.cliprange_value=-0.2", "ppo.vf_coef=-1", "ppo.target_kl=0", "ppo.max_grad_norm=0",
    "rollout.temperature=0", "rollout.temperature=-1", "rollout.top_p=0", "reward.score_clip=0",
    "data.test_fraction=0", "data.test_fraction=1", "eval.confidence=0", "rollout.min_new_tokens=-1",
    # not numbers at all
    "ppo.learning_rate=fast", "ppo.learning_rate=.nan", "ppo.batch_size=8.5", "ppo.steps=true",
])
def test_zero_negative_or_non_numeric_rates_and_sizes(override):
    key, raw = override.split("=", 1)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    msg = one_line(e, key)
    assert "accepted:" in msg


@pytest.mark.parametrize("override,field", [
    ("ppo.gradient_accumulation_steps=3", "ppo.batch_size"),  # 32 is not a multiple of 8 x 3
    ("ppo.mini_batch_size=12", "ppo.batch_size"),  # nor of 12
])
def test_batch_size_not_divisible_by_mini_batch_times_accumulation(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert "ppo.mini_batch_size x ppo.gradient_accumulation_steps" in one_line(e, field)


@pytest.mark.parametrize("yaml_text,field,suggestion", [
    ("ppo:\n  learnig_rate: 0.1\n", "ppo.learnig_rate", "ppo.learning_rate"),
    ("rolout:\n  top_k: 5\n", "rolout", "rollout"),
    ("reward:\n  lable: hate\n", "reward.lable", "reward.label"),
])
def test_unknown_keys_in_a_yaml_file_suggest_the_nearest(tmp_path, yaml_text, field, suggestion):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    msg = one_line(e, field)
    # a misspelt section gets a key of that section ('rollout.top_p'): the section name is in it
    assert f"did you mean '{suggestion}" in msg and str(f) in msg


@pytest.mark.parametrize("yaml_text,field", [
    ("ppo: [1, 2]\n", "ppo"),
    ("- just\n- a list\n", "--config"),
    ("ppo:\n  steps: [\n", "--config"),
])
def test_malformed_yaml_files(tmp_path, yaml_text, field):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    one_line(e, field)


def test_config_file_not_found(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", tmp_path / "missing.yaml")
    one_line(e, "--config")


def test_trust_remote_code_is_off_unless_turned_on():
    from harness.config import PRESETS

    for preset in PRESETS:
        cfg = load_config(preset)
        assert cfg.policy.trust_remote_code is False and cfg.reward.trust_remote_code is False
    with pytest.raises(ConfigError):
        load_config("tiny", overrides=["policy.trust_remote_code=maybe"])
    assert load_config("tiny", overrides=["policy.trust_remote_code=true"]).policy.trust_remote_code is True


@pytest.mark.parametrize("override,field", [("eval.temperature=0", "eval.temperature"),
                                            ("ppo.learning_rate=.inf", "ppo.learning_rate"),
                                            ("ppo.cliprange=.inf", "ppo.cliprange"),
                                            ("ppo.vf_coef=.nan", "ppo.vf_coef"),
                                            ("thresholds.max_kl=.inf", "thresholds.max_kl")])
def test_config_rejects_non_positive_temperature_and_non_finite_numbers(override, field):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=[override])
    assert str(info.value).startswith(f"{field}: ")


# ============================================================================================ the CLI

@pytest.mark.parametrize("args,field", [
    (["run", "ppo.batchsize=8"], "ppo.batchsize"),
    (["run", "rollout.length_min=60"], "rollout.length_max"),
    (["run", "ppo.learning_rate=-1"], "ppo.learning_rate"),
    (["eval", "ppo.ppo_epochs=0"], "ppo.ppo_epochs"),
    (["run", "--preset", "gpt-5"], "preset"),
])
def test_cli_prints_one_line_without_traceback_and_exits_2(capsys, args, field):
    from harness.cli import main

    code = main(args + ["--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"detox-harness: error: {field}: ")
    assert "Traceback" not in err + out


# ============================================================================================ limits (issue 27)

@pytest.mark.parametrize("override,field,accepted", [
    ("seed=99999999999999999999999", "seed", "[0, 4294967295]"),  # past torch.manual_seed's 64 bits
    ("seed=4294967296", "seed", "[0, 4294967295]"),  # past numpy's 32-bit seed (transformers.set_seed, sft)
    ("eval.seed=-1", "eval.seed", "[0, 4294967295]"),
    ("eval.max_new_tokens=999999999999", "eval.max_new_tokens", "[1, 2048]"),
    ("rollout.length_max=99999999999999", "rollout.length_max", "2049]"),
    ("eval.samples_per_prompt=99999999999999", "eval.samples_per_prompt", "[1, 1000]"),
    ("eval.bootstrap_resamples=10000000000", "eval.bootstrap_resamples", "[1, 1000000]"),
    ("policy.lora_r=1000000000", "policy.lora_r", "[1, 4096]"),
    ("sft.max_target_tokens=1000000", "sft.max_target_tokens", "[1, 2048]"),
    ("sft.generation_max_new_tokens=1000000", "sft.generation_max_new_tokens", "[1, 2048]"),
    ("data.max_prompt_tokens=10000000", "data.max_prompt_tokens", "[1, 8192]"),
    ("reward.max_length=10000000", "reward.max_length", "[1, 8192]"),
])
def test_out_of_range_seeds_and_sizes_say_their_accepted_range(override, field, accepted):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    msg = one_line(e, field)
    assert f"got {override.split('=', 1)[1]}" in msg and accepted in msg


@pytest.mark.parametrize("override", ["seed=4294967295", "eval.max_new_tokens=2048", "rollout.length_max=2049",
                                      "eval.samples_per_prompt=1000", "policy.lora_r=4096"])
def test_the_limits_themselves_are_accepted(override):
    key, value = override.split("=")
    section, _, name = key.rpartition(".")
    cfg = load_config("tiny", overrides=[override])
    assert getattr(getattr(cfg, section) if section else cfg, name) == int(value)


@pytest.mark.parametrize("args,field", [
    (["--seed", "99999999999999999999999"], "seed"),
    (["eval.max_new_tokens=999999999999"], "eval.max_new_tokens"),
    (["rollout.length_max=99999999999999"], "rollout.length_max"),
    (["eval.samples_per_prompt=99999999999999"], "eval.samples_per_prompt"),
])
def test_cli_refuses_a_huge_seed_or_size_before_any_folder_is_made(tmp_path, capsys, args, field):
    """Once exit 4 ("a bug") after a stub run folder was made, with a --resume hint that could never work."""
    from harness.cli import main

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "index.html").write_text("the history page")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["run", "--preset", "tiny", "--no-progress", "--output", str(reports / "run"), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"detox-harness: error: {field}: ") and "accepted: an integer in " in lines[0]
    assert "--resume" not in lines[0]
    assert sorted(tmp_path.rglob("*")) == sorted([reports, *before])  # no run folder, nothing else made
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("args,field", [(["baseline", "--seeds", "0,1,4294967296"], "--seeds"),
                                        (["build-tiny", "--seed", "99999999999999999999"], "--seed")])
def test_cli_seed_lists_and_world_seeds_have_the_same_range(capsys, args, field):
    from harness.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"error: {field}: " in err and "4294967295]" in err


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
def test_a_policy_directory_without_tokenizer_files_is_bad_input(tmp_path, keep):
    """Once a warning and a run on nothing but unknown tokens (transformers builds an empty vocabulary from the
    config alone), ending in exit 1 as if the model had regressed."""
    from harness.models import load_policy

    d = tmp_path / "model"
    shutil.copytree(FX / "model", d)
    for name in ("tokenizer.json", "spiece.model", "special_tokens_map.json", "tokenizer_config.json"):
        if name not in keep:
            (d / name).unlink(missing_ok=True)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ModelLoadError) as e:
        load_policy(PolicyConfig(model=str(d), dtype="float32"))
    msg = one_line(e, "policy.model")
    assert str(d) in msg and "tokenizer" in msg.split(str(d))[0]
    if not keep:  # transformers itself fails on this fixture's tokenizer_config.json (a fast tokenizer's class)
        assert "no tokenizer vocabulary" in msg and "tokenizer.save_pretrained" in msg
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_a_classifier_directory_without_tokenizer_files_is_bad_input(tmp_path, t5_tokenizer):
    from transformers import AutoTokenizer

    from harness.models import load_pretrained

    d = tmp_path / "clf"
    t5_tokenizer.save_pretrained(d)
    for name in ("tokenizer.json", "spiece.model"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError) as e:
        load_pretrained(AutoTokenizer, str(d), field="reward.model", what="classifier tokenizer")
    assert "no classifier tokenizer vocabulary" in one_line(e, "reward.model")
