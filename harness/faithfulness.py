"""Faithfulness: does a summary still say what its dialogue said? An NLI judge, read the SummaC zero-shot way.

The judge is any NLI cross-encoder (``eval.faithfulness_model``: a hub id or a directory written by
``save_pretrained``; ``FacebookAI/roberta-large-mnli`` for the real presets) reading (premise = the dialogue,
hypothesis = the summary). Its labels are read by name from ``config.id2label``, case-insensitively
(``entailment``, ``contradiction``), never by position: MNLI checkpoints disagree on the order.

A dialogue is usually longer than the judge's window, and a summary holds several claims, so a summary is
scored the way SummaC's zero-shot model does (Laban et al., 2022), with one change (the minimum):

1. the dialogue is split into *windows* of whole turns (lines) that fit, together with the hypothesis
   sentence, in the judge's input; consecutive windows overlap by one turn (a claim that joins the end of
   one window and the start of the next is still seen whole); a turn that alone exceeds the window is a
   window of its own, cut by truncation;
2. the summary is split into sentences (:func:`split_sentences`: ``#Person1#`` is no sentence end);
3. a sentence's score is the maximum over the windows of P(entailment) (softmax over the judge's labels):
   it is supported if some part of the dialogue supports it;
4. the summary's score is the *minimum* over its sentences: every sentence must be supported, so one
   invented claim makes the summary unfaithful however well the rest is supported (SummaC averages).

An empty or whitespace-only summary scores 0.0 (it says nothing the dialogue says). Every (window, sentence)
pair of a call is scored in batches of ``batch_size``, each pair once. ``docs/evaluation.md`` has the method.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .errors import ModelLoadError
from .toxicity import input_limit, label_ids, load_sequence_classifier

FIELD = "eval.faithfulness_model"
ENTAILMENT = "entailment"
CONTRADICTION = "contradiction"

#: words ending in a full stop that end no sentence ("Mr. Smith", "e.g. this")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
                           "no", "approx", "dept", "mt", "ft", "inc", "ltd", "co"})
# a sentence ends at . ! ? (and closing quotes or brackets) followed by white space; a line break always ends one
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
# a turn of a DialogSum dialogue starts with its speaker tag, "#Person1#: "
_SPEAKER_TAG = re.compile(r"(?=#[^#\s]{1,40}#\s*:)")


def split_sentences(text: str) -> list[str]:
    """The sentences of a summary: split at ``.``, ``!`` or ``?`` followed by white space, and at line breaks.

    A full stop after a known abbreviation (:data:`ABBREVIATIONS`) or a single letter ("J. Smith") ends no
    sentence; ``#Person1#`` holds no sentence end at all. Empty pieces are dropped.
    """
    out: list[str] = []
    for line in str(text or "").splitlines():
        pending, start = "", 0
        for m in _SENTENCE_END.finditer(line):
            pending += line[start:m.end()]
            start = m.end()
            last = pending.split()[-1].rstrip("\"')]") if pending.strip() else ""
            word = last.rstrip(".!?").lower()
            if last.endswith(".") and (word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
                continue  # "Mr. Smith", "J. Smith": not the end of a sentence
            if pending.strip():
                out.append(pending.strip())
            pending = ""
        pending += line[start:]
        if pending.strip():
            out.append(pending.strip())
    return out


def split_turns(dialogue: str) -> list[str]:
    """The turns of a dialogue: its non-empty lines, stripped. A dialogue on one line that holds several
    speaker tags (``#Person1#: ... #Person2#: ...``, as a decoded prompt gives it back) is split before each."""
    lines = [line.strip() for line in str(dialogue or "").splitlines() if line.strip()]
    if len(lines) == 1 and len(_SPEAKER_TAG.findall(lines[0])) > 1:
        lines = [t.strip() for t in _SPEAKER_TAG.split(lines[0]) if t.strip()]
    return lines


class FaithfulnessJudge:
    """An NLI cross-encoder with its tokenizer: :meth:`score` gives each (dialogue, summary) its faithfulness."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None, field: str = FIELD):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = input_limit(model, tokenizer, max_length)
        self.field = field
        self.label2id = label_ids(model.config)
        by_name = {name.lower(): index for name, index in self.label2id.items()}
        if ENTAILMENT not in by_name:
            labels = ", ".join(sorted(self.label2id, key=self.label2id.get)) or "none"  # in index order
            raise ModelLoadError(f"is not an NLI model: it has no '{ENTAILMENT}' label (its labels: {labels})",
                                 field=field, fix="give an NLI cross-encoder whose config names its labels, e.g. "
                                                  "FacebookAI/roberta-large-mnli (CONTRADICTION, NEUTRAL, "
                                                  "ENTAILMENT), or null for no faithfulness judge")
        self.entailment_index = by_name[ENTAILMENT]
        self.contradiction_index = by_name.get(CONTRADICTION)  # None for a two-way (entailment / not) judge
        # tokens a (premise, hypothesis) pair adds: <s> A </s></s> B </s> for RoBERTa, [CLS] A [SEP] B [SEP] for BERT
        self.special_tokens = int(tokenizer.num_special_tokens_to_add(pair=True))
        self._separator = len(self._ids("\n"))  # what joining two turns with a line break costs

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, location: str, *, device: str | torch.device = "cpu", batch_size: int = 16,
             max_length: int | None = None, field: str = FIELD, trust_remote_code: bool = False) -> FaithfulnessJudge:
        model, tokenizer = load_sequence_classifier(
            location, field=field, device=device, trust_remote_code=trust_remote_code, what="NLI model",
            fix="give an NLI cross-encoder fine-tuned on MNLI-like data (e.g. FacebookAI/roberta-large-mnli), not a "
                "base or seq2seq model")
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, field=field)

    # ---------------------------------------------------------------------------------- pieces

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def premise_budget(self, hypothesis: str) -> int:
        """How many tokens of dialogue fit beside ``hypothesis`` in one input (at least 1)."""
        return max(1, self.max_length - self.special_tokens - len(self._ids(hypothesis)))

    def fit_hypothesis(self, sentence: str) -> str:
        """``sentence``, cut to half the judge's input when it is longer (the dialogue keeps the other half):
        a runaway "sentence" of a degenerate summary cannot push the whole dialogue out."""
        ids = self._ids(sentence)
        keep = (self.max_length - self.special_tokens) // 2
        return sentence if len(ids) <= keep else self.tokenizer.decode(ids[:keep]).strip()

    def windows(self, turns: Sequence[str], budget: int, lengths: Sequence[int] | None = None) -> list[str]:
        """Consecutive turns joined by line breaks, each window at most ``budget`` tokens, overlapping the next
        by one turn (when that turn and the next fit together). A turn longer than ``budget`` is a window alone.
        ``lengths``: each turn's token count, when known."""
        turns = list(turns)
        if not turns:
            return [""]
        lengths = list(lengths) if lengths is not None else [len(self._ids(t)) for t in turns]

        def size(lo: int, hi: int) -> int:  # tokens of turns[lo:hi] joined by line breaks
            return sum(lengths[lo:hi]) + self._separator * max(0, hi - lo - 1)

        out, start, n = [], 0, len(turns)
        while True:
            end = start + 1
            while end < n and size(start, end + 1) <= budget:
                end += 1
            out.append("\n".join(turns[start:end]))
            if end >= n:
                return out
            # the next window starts with this one's last turn, unless it is this window's only turn or it does
            # not fit beside the next turn (then that window would repeat a turn already seen, adding nothing)
            start = end - 1 if end - 1 > start and size(end - 1, end + 1) <= budget else end

    # ---------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def probabilities(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """(N, num_labels) softmax probabilities of each (premise, hypothesis) pair, in batches, on the CPU.
        The premise is truncated when the pair does not fit (``truncation="only_first"``)."""
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises for {len(hypotheses)} hypotheses")
        out = []
        for i in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(list(premises[i:i + self.batch_size]), list(hypotheses[i:i + self.batch_size]),
                                 truncation="only_first", max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            out.append(torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu())
        if not out:
            return torch.zeros((0, len(self.label2id)))
        return torch.cat(out)

    def entailment(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        """P(entailment) of each (premise, hypothesis) pair."""
        return self.probabilities(premises, hypotheses)[:, self.entailment_index].tolist()

    def score(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        """The faithfulness of each summary (``hypotheses[i]``) to its dialogue (``premises[i]``), in [0, 1]:
        the minimum over its sentences of the maximum over the dialogue's windows of P(entailment)."""
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} dialogues for {len(hypotheses)} summaries")
        turn_cache: dict[str, tuple[list[str], list[int]]] = {}
        window_cache: dict[tuple[str, int], list[str]] = {}
        pairs: dict[tuple[str, str], int] = {}  # every distinct (window, sentence) once, in the order first seen
        plan: list[list[list[int]] | None] = []  # per summary: per sentence, the indices of its pairs
        for premise, summary in zip(premises, hypotheses):
            sentences = [self.fit_hypothesis(s) for s in split_sentences(summary)]
            if not sentences:
                plan.append(None)
                continue
            if premise not in turn_cache:
                turns = split_turns(premise)
                turn_cache[premise] = (turns, [len(self._ids(t)) for t in turns])
            turns, lengths = turn_cache[premise]
            per_sentence = []
            for sentence in sentences:
                budget = self.premise_budget(sentence)
                key = (premise, budget)
                if key not in window_cache:
                    window_cache[key] = self.windows(turns, budget, lengths)
                per_sentence.append([pairs.setdefault((w, sentence), len(pairs)) for w in window_cache[key]])
            plan.append(per_sentence)
        ordered = list(pairs)
        # longest first, so that a batch pads to similar lengths; each pair keeps its index
        order = sorted(range(len(ordered)), key=lambda i: -(len(ordered[i][0]) + len(ordered[i][1])))
        values = [0.0] * len(ordered)
        probs = self.entailment([ordered[i][0] for i in order], [ordered[i][1] for i in order])
        for i, p in zip(order, probs):
            values[i] = float(p)
        return [0.0 if sentences is None else min(max(values[j] for j in windows) for windows in sentences)
                for sentences in plan]


def load_faithfulness_judge(cfg, device) -> FaithfulnessJudge | None:
    """The run's faithfulness judge (``eval.faithfulness_model``) on ``device``; None when it is null."""
    e = cfg.eval
    if not e.faithfulness_model:
        return None
    return FaithfulnessJudge.load(e.faithfulness_model, device=device, batch_size=e.faithfulness_batch_size,
                                  field=FIELD)
