"""Fixtures for the fast unit suite: small artifacts built in-process in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, corpus) -> Path:
    d = tmp_path_factory.mktemp("dialogues")
    for split, rows in corpus.items():
        with open(d / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 1-layer T5 (d_model 16) saved with save_pretrained next to the fixture tokenizer (``tiny_t5.py``)."""
    import torch
    from tiny_t5 import TOKENIZER_DIR
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
                      num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def undrawn_plots(monkeypatch) -> set[str]:
    """A report page with its plots built but not drawn, for tests of the page around them.

    Drawing the figures is most of a page's render (about 1 s of its 1.2 s on 2 cores): tests about tables,
    links, escaping or the verdict do not need it. Every plot is still built by :mod:`harness.report.plots`
    from the run's files, and becomes an empty ``<svg>`` with the same ``data-plot`` name and accessible
    label, holding the figure's own texts (title, axis labels, legend entries) as ``<text>`` elements, so a
    test can still count, name and read them. Add a name prefix to the returned set (``"curve-"``) to draw
    those plots for real. The drawn SVG itself is tested on the real pages (``test_report``'s ``demo``).
    """
    from markupsafe import Markup

    from harness.report import plots

    drawn: set[str] = set()
    draw = plots.to_svg

    def sketch(fig, name, label, uid=None):
        if drawn and name.startswith(tuple(drawn)):
            return draw(fig, name, label, uid)
        texts = Markup("").join(Markup("<text>{}</text>").format(t.get_text()) for t in _texts(fig) if t.get_text())
        return Markup('<svg class="plot" role="img" aria-label="{}" data-plot="{}">{}</svg>').format(label, name, texts)

    monkeypatch.setattr(plots, "to_svg", sketch)
    return drawn


def _texts(fig) -> list:
    """A figure's own texts: titles, axis labels, annotations, legend entries (not the tick labels, which
    matplotlib makes only when it draws)."""
    out = list(fig.texts)
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        if ax.get_legend() is not None:
            out += ax.get_legend().get_texts()
    out += [t for legend in fig.legends for t in legend.get_texts()]
    return out
