"""DialogSum loading, filtering, prompting, tokenizing and splitting (REFERENCE.md, step 1).

Sources: a Hugging Face Hub id (default ``knkarthick/dialogsum``), a local JSON/JSONL/CSV file, or a
directory holding one file per split (``train.jsonl``, ``dialogsum.dev.jsonl``, ...). Both column
layouts are accepted: the Hub's ``id, dialogue, summary, topic`` and the original release's
``fname, dialogue, summary`` / ``summary1..3``. Every reference summary is kept (``summaries``, a
list) for evaluation; rows that repeat a dialogue once per reference (the Hub's test split) are merged.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig
from .errors import DataError, first_line

SPLIT_ALIASES = {"validation": ("validation", "dev", "val"), "dev": ("dev", "validation", "val"),
                 "train": ("train",), "test": ("test",)}
EXTENSIONS = (".jsonl", ".json", ".csv")


@dataclass
class PromptData:
    """Tokenized prompts, split 80/20 without shuffling, and what happened on the way."""

    train: "object"  # datasets.Dataset
    test: "object"
    stats: dict = field(default_factory=dict)


def _find_split_file(directory: Path, split: str) -> Path:
    files = sorted(p for p in directory.iterdir() if p.suffix in EXTENSIONS and p.is_file())
    if not files:
        raise DataError("no .jsonl, .json or .csv file in the directory", field="data.path", value=str(directory))
    for alias in SPLIT_ALIASES.get(split, (split,)):
        for p in files:
            stem = p.name[: -len(p.suffix)]
            if stem == alias or stem.endswith(f".{alias}") or stem.endswith(f"_{alias}") or stem.endswith(f"-{alias}"):
                return p
    if len(files) == 1:
        return files[0]
    raise DataError(f"no file for split '{split}' in the directory (found {', '.join(p.name for p in files)})",
                    field="data.split", value=split, fix="set data.split to one of the file names' splits, "
                                                         "or data.path to a single file")


def _innermost(exc: BaseException) -> BaseException:
    """The root cause of a chained exception (datasets wraps the parser's error in its own)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
        if nxt is None:
            break
        exc = nxt
    return exc


@contextmanager
def _quiet_datasets():
    """No progress bars and no ERROR log lines from ``datasets`` while it reads a file: a bad file must
    end in one clear line from the harness, not in a parser's log output before it."""
    try:
        import datasets
        from datasets.utils import logging as ds_logging

        bars_off = datasets.are_progress_bars_disabled()
        level = ds_logging.get_verbosity()
        datasets.disable_progress_bars()
        ds_logging.set_verbosity(ds_logging.CRITICAL)
    except Exception:  # pragma: no cover - a datasets release without these helpers: stay noisy
        yield
        return
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_off:
            datasets.enable_progress_bars()


def _read_file(path: Path):
    """The raw rows of one local file: a list of dicts for JSON / JSON lines, a ``datasets.Dataset`` for CSV.

    JSON is parsed with the standard library rather than through ``datasets``' pyarrow JSON reader: that
    reader can crash the whole process (a segmentation fault, seen here on fuzzed files with mixed types),
    and a bad file must end in one clear line that says where it is broken, never in a crash.
    """
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise DataError("unsupported file type", field="data.path", value=str(path),
                        fix="give a .jsonl, .json or .csv file")
    fix = "check that it is valid JSON lines / JSON / CSV with a 'dialogue' column"
    try:  # cheap checks first, with messages that say what is wrong
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or first_line(e)}", field="data.path", value=str(path),
                        fix="check the path and the file's permissions") from e
    if not head.strip():
        raise DataError("the file is empty", field="data.path", value=str(path), fix=fix)
    if kind == "json":
        return _read_json_records(path, fix)
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            return load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        root = _innermost(e)
        detail = first_line(root)
        if root is not e and first_line(e) not in detail:
            detail = f"{detail} ({type(root).__name__})"
        raise DataError(f"cannot read the file: {detail}", field="data.path", value=str(path), fix=fix) from e


def _read_json_records(path: Path, fix: str) -> list:
    """Rows of a JSON file (a list of records, or a mapping of equally long columns) or of JSON lines."""
    def bad(detail: str) -> DataError:
        return DataError(f"cannot read the file: {detail}", field="data.path", value=str(path), fix=fix)

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text (byte {e.start})") from e
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except RecursionError as e:
            raise bad("not valid JSON: nested too deeply") from e
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": one object per line in a .json file, read as JSON lines
                raise bad(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        else:
            if isinstance(data, list):
                return data
            columns = list(data.values()) if isinstance(data, dict) else []
            if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
                return [dict(zip(data, values)) for values in zip(*columns)]
            raise bad("a JSON file must hold a list of records or a mapping of equally long columns "
                      f"(got a {type(data).__name__})")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except RecursionError as e:
            raise bad(f"not valid JSON lines: line {lineno} is nested too deeply") from e
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON lines: line {lineno}, column {e.colno}: {e.msg}") from e
    return rows


def resolve_data_path(location: str) -> str:
    """A data location as the loader reads it (``~`` expanded); a ``tiny://`` id is the plan's to resolve."""
    if str(location).startswith("tiny://"):
        raise DataError("a tiny:// id reached the data loader unresolved", field="data.path", value=str(location),
                        fix="load through a plan (harness.plan.concrete(cfg) gives the directories)")
    return os.path.expanduser(str(location))


def load_rows(path: str, split: str = "train"):
    """Raw rows of one split (hub id, file or directory): a ``datasets.Dataset``, or for local JSON / JSON lines
    files a list of dicts (see :func:`_read_file`); :func:`normalize` takes either."""
    location = resolve_data_path(path)
    p = Path(location)
    if p.is_dir():
        return _read_file(_find_split_file(p, split))
    if p.is_file():
        return _read_file(p)
    if location.startswith((".", "/", "~")) or location.endswith(EXTENSIONS):
        raise DataError("file or directory does not exist", field="data.path", value=location)
    from datasets import load_dataset

    from .models import hub_offline, offline

    try:
        with hub_offline(), _quiet_datasets():
            return load_dataset(location, split=split)
    except Exception as e:
        where = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache" if offline()
                 else "the machine may be offline or the id wrong")
        raise DataError(f"cannot load dataset '{location}' split '{split}': {first_line(e)}", field="data.path",
                        value=location, fix=f"{where}: download the files on a connected machine and set data.path "
                                            "to the local file or directory (a local path)") from e


def _columns_and_rows(rows):
    """Column names and an iterable of mappings, from a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(rows, "column_names"):
        return list(rows.column_names), rows
    rows = list(rows)
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"row {i} is a {type(row).__name__}, not a record with named columns",
                            field="data.path", fix="every row must be an object with 'dialogue' and 'summary'")
        for key in row:
            columns.setdefault(str(key), None)
    return list(columns), rows


def normalize(rows, source: str | None = None) -> list[dict]:
    """Rows with ``id, dialogue, summaries (list), topic``; dialogues repeated per reference are merged.

    ``rows`` is a ``datasets.Dataset`` or a list of dicts (keys missing from a row read as null).
    Anything unusable raises :class:`DataError` naming ``data.path``, the row and the column.
    """
    columns, rows = _columns_and_rows(rows)
    where = f" of {source}" if source else ""
    if "dialogue" not in columns:
        raise DataError(f"missing column 'dialogue'{where} (found columns: {', '.join(columns) or 'none'})",
                        field="data.path", fix="the data needs a 'dialogue' column and 'summary' or 'summary1'..")
    summary_cols = ["summary"] if "summary" in columns else sorted(c for c in columns if c.startswith("summary")
                                                                    and c[7:].isdigit())
    if not summary_cols:
        raise DataError(f"missing column 'summary'{where} (found columns: {', '.join(columns)})", field="data.path",
                        fix="the data needs 'summary' or 'summary1', 'summary2', ... columns")
    id_col = "id" if "id" in columns else ("fname" if "fname" in columns else None)
    topic_col = "topic" if "topic" in columns else ("topic1" if "topic1" in columns else None)
    merged: dict[str, dict] = {}
    for i, row in enumerate(rows):
        dialogue = row.get("dialogue")
        rid = row.get(id_col) if id_col else None
        rid = str(rid) if rid is not None else str(i)
        if not isinstance(dialogue, str):
            shown = repr(dialogue)[:40] if dialogue is None or isinstance(dialogue, (int, float, bool)) \
                else f"a {type(dialogue).__name__}"
            raise DataError(f"row {i} (id {rid}){where}: column 'dialogue' is not text (got {shown})",
                            field="data.path",
                            fix="every row needs a non-empty text dialogue; remove or fix that row")
        if not dialogue.strip():
            raise DataError(f"row {i} (id {rid}){where}: column 'dialogue' is empty (got {dialogue[:20]!r})",
                            field="data.path", fix="every row needs a non-empty text dialogue; remove or fix that row")
        summaries = [row.get(c) for c in summary_cols]
        summaries = [s for s in summaries if isinstance(s, str) and s.strip()]
        if dialogue in merged:
            for s in summaries:
                if s not in merged[dialogue]["summaries"]:
                    merged[dialogue]["summaries"].append(s)
            continue
        topic = row.get(topic_col) if topic_col else None
        merged[dialogue] = {"id": rid, "dialogue": dialogue, "summaries": summaries,
                            "topic": str(topic) if topic is not None else ""}
    return list(merged.values())


def filter_by_length(rows: list[dict], min_chars: int, max_chars: int) -> list[dict]:
    """Keep dialogues with min_chars < len(dialogue) < max_chars (exclusive, as the reference)."""
    return [r for r in rows if min_chars < len(r["dialogue"]) < max_chars]


def make_prompt(template: str, dialogue: str) -> str:
    return template.replace("{dialogue}", dialogue)


def prompt_dialogues(rows, template: str) -> list[str]:
    """The dialogue of every row of a prompt dataset: its ``dialogue`` column when it has one (the prepared
    datasets of :func:`tokenized_prompts` do), else its ``query`` with the prompt template's text around
    ``{dialogue}`` taken off (:func:`dialogue_from_prompt`)."""
    if "dialogue" in rows.column_names:
        return [str(d) for d in rows["dialogue"]]
    return [dialogue_from_prompt(q, template) for q in rows["query"]]


def dialogue_from_prompt(prompt: str, template: str) -> str:
    """``prompt`` without the template's text before and after ``{dialogue}``, compared with white space
    collapsed (a decoded prompt loses the template's line breaks); the prompt, stripped, when it does not
    start and end that way (e.g. a prompt cut short at ``data.max_prompt_tokens`` keeps its head only)."""
    def words(text: str) -> str:  # the text's words, any white space (or none) between them
        return r"\s*".join(re.escape(word) for word in text.split())

    head, _, tail = template.partition("{dialogue}")
    text = prompt.strip()
    if head.strip():
        m = re.match(words(head) + r"\s*", text)
        text = text[m.end():] if m else text
    if tail.strip():
        m = re.search(r"\s*" + words(tail) + r"\Z", text)
        text = text[:m.start()] if m else text
    return text.strip()


def prompt_token_limit(cfg: DataConfig, tokenizer) -> int:
    if cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))


def tokenized_prompts(cfg: DataConfig, tokenizer, split: str | None = None):
    """Load ``split`` (default ``cfg.split``), filter by length, wrap in the prompt template and tokenize
    (cut at :func:`prompt_token_limit`, EOS kept). Returns a ``datasets.Dataset`` with ``id, dialogue,
    summaries, topic, prompt, input_ids, query`` and the counts of what happened on the way."""
    from datasets import Dataset

    split = split or cfg.split
    raw = load_rows(cfg.path, split)
    rows = normalize(raw, source=resolve_data_path(cfg.path))
    if not rows:
        raise DataError("the data holds no rows", field="data.path", value=cfg.path,
                        fix="give a file or split with dialogues")
    kept = filter_by_length(rows, cfg.min_chars, cfg.max_chars)
    if not kept:
        lengths = [len(r["dialogue"]) for r in rows]
        raise DataError(f"all {len(rows)} dialogues were removed by the length filter "
                        f"data.min_chars {cfg.min_chars} < len(dialogue) < data.max_chars {cfg.max_chars} "
                        f"(their lengths: {min(lengths)} to {max(lengths)} characters)", field="data.min_chars",
                        fix="widen data.min_chars / data.max_chars to include them")
    if cfg.max_rows:
        kept = kept[: cfg.max_rows]
    limit = prompt_token_limit(cfg, tokenizer)
    from .models import quiet_libraries

    prompts = [make_prompt(cfg.prompt_template, r["dialogue"]) for r in kept]
    with quiet_libraries():  # the harness truncates long rows itself and counts them (no "indexing errors" notice)
        full = tokenizer(prompts, truncation=False)["input_ids"]
        unknown = unknown_token_dialogues([r["dialogue"] for r in kept], tokenizer)
    truncated = sum(len(ids) > limit for ids in full)
    input_ids = [ids[:limit - 1] + [ids[-1]] if len(ids) > limit and tokenizer.eos_token_id == ids[-1]
                 else ids[:limit] for ids in full]
    queries = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    ds = Dataset.from_dict({
        "id": [r["id"] for r in kept], "dialogue": [r["dialogue"] for r in kept],
        "summaries": [r["summaries"] for r in kept], "topic": [r["topic"] for r in kept],
        "prompt": prompts, "input_ids": input_ids, "query": queries,
    })
    stats = {"rows_read": len(raw), "dialogues": len(rows), "kept": len(kept),
             "removed_by_length": len(rows) - len(filter_by_length(rows, cfg.min_chars, cfg.max_chars)),
             "truncated_prompts": truncated, "max_prompt_tokens": limit, "unknown_token_dialogues": unknown}
    import logging

    if truncated:
        logging.getLogger(__name__).warning("%d of %d prompts were longer than %d tokens and were truncated",
                                            truncated, len(kept), limit)
    if unknown:
        logging.getLogger(__name__).warning(
            "%d of %d dialogues are mostly characters the policy's tokenizer cannot represent (emoji, another "
            "script, ...): the policy reads them as unknown tokens, so their summaries cannot be judged fairly",
            unknown, len(kept))
    return ds, stats


def build_prompts(cfg: DataConfig, tokenizer, *, min_test_rows: int = 1, min_train_rows: int = 1) -> PromptData:
    """Load, filter, wrap, tokenize and split (80/20, no shuffle: the first 80% train) the dialogues."""
    ds, stats = tokenized_prompts(cfg, tokenizer)
    if len(ds) < 2:
        raise DataError(f"only {len(ds)} dialogue left after filtering: too few to split 80/20", field="data.path",
                        fix="give more data or widen the length filter")
    n_test = math.ceil(cfg.test_fraction * len(ds))  # datasets' own rounding (train_test_split)
    if n_test < 1 or len(ds) - n_test < 1:
        raise DataError(f"{len(ds)} dialogues cannot be split with data.test_fraction {cfg.test_fraction}: "
                        f"a split would be empty", field="data.test_fraction",
                        fix="give more data or choose a fraction that leaves both splits non-empty")
    try:
        split = ds.train_test_split(test_size=cfg.test_fraction, shuffle=False)
    except ValueError as e:  # rounding corner cases of datasets' split arithmetic
        raise DataError(f"cannot split {len(ds)} dialogues: {first_line(e)}", field="data.test_fraction",
                        value=cfg.test_fraction, fix="give more data or change data.test_fraction") from e
    train, test = split["train"], split["test"]
    test, overlap = without_training_dialogues(train, test)
    if len(train) < min_train_rows:
        raise DataError(f"the train split has {len(train)} prompts, fewer than one batch of {min_train_rows}",
                        field="ppo.batch_size", fix="lower ppo.batch_size or give more data")
    if len(test) < min_test_rows:
        removed = f" ({overlap} removed: their dialogue is a training dialogue)" if overlap else ""
        raise DataError(f"the test split has {len(test)} prompts{removed}, fewer than {min_test_rows} needed",
                        field="eval.num_samples", fix="lower eval.num_samples or give more data")
    stats = {**{k: v for k, v in stats.items() if k != "unknown_token_dialogues"}, "train": len(train),
             "test": len(test), "test_overlap_removed": overlap,
             "unknown_token_dialogues": stats["unknown_token_dialogues"]}
    return PromptData(train=train, test=test, stats=stats)


def without_training_dialogues(train, test):
    """(``test`` without the rows whose dialogue is also a training dialogue, how many were removed). Dialogues
    are compared as :func:`harness.metrics.normalize_summary` writes them: lower-cased, punctuation out, white
    space collapsed, so a training dialogue with a trailing space or another capital still counts as seen."""
    from .metrics import normalize_summary

    seen = {normalize_summary(d) for d in train["dialogue"]}
    keep = [i for i, d in enumerate(test["dialogue"]) if normalize_summary(d) not in seen]
    removed = len(test) - len(keep)
    if removed:
        import logging

        logging.getLogger(__name__).warning("%d of %d test prompts were removed: their dialogue is a training "
                                            "dialogue (case, white space and punctuation aside)", removed, len(test))
        test = test.select(keep)
    return test, removed


#: a dialogue is "mostly unknown" when at least this share of its visible characters fall in unknown tokens
UNKNOWN_SHARE = 0.5


def unknown_token_dialogues(dialogues: list[str], tokenizer) -> int:
    """How many dialogues tokenize to nothing, or have at least :data:`UNKNOWN_SHARE` of their visible
    characters inside unknown tokens (a SentencePiece tokenizer folds a run of emoji into one ``<unk>``, so
    characters are counted, not tokens; a slow tokenizer without offsets counts tokens)."""
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - ({unk} if unk is not None else set())
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(dialogues, add_special_tokens=False, return_offsets_mapping=fast)
    count = 0
    for i, ids in enumerate(enc["input_ids"]):
        kept = [(j, t) for j, t in enumerate(ids) if t not in special]
        if not kept:
            count += 1
            continue
        if unk is None:
            continue
        if fast:
            text = dialogues[i]
            visible = sum(not c.isspace() for c in text) or 1
            hidden = sum(sum(not c.isspace() for c in text[a:b]) for j, t in kept if t == unk
                         for a, b in [enc["offset_mapping"][i][j]])
            share = hidden / visible
        else:
            share = sum(t == unk for _, t in kept) / len(kept)
        count += share >= UNKNOWN_SHARE
    return count
