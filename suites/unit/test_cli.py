"""The command line's contract: one exit code per kind of outcome, one line per error, a summary that never
crashes on a figure that was not measured. No models: the run job is replaced where a test needs a run."""

from __future__ import annotations

import copy

import pytest

from harness import cli, errors
from harness.config import load_config
from harness.errors import ConfigError, DataError, HarnessError, TrainingError
from harness.jobs import run as run_job
from harness.metrics import EvalOutput, phase_metrics, relative_improvement
from harness.report.formats import NOT_MEASURED
from harness.report.text import phase_line, summary_table
from harness.results import build_results


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("exc, code, word", [
    (TrainingError("3 consecutive steps had a non-finite reward", field="ppo.max_bad_steps"),
     errors.EXIT_TRAINING_FAILED, "training failed"),
    (ConfigError("unknown key", field="ppo.batchsize"), errors.EXIT_BAD_INPUT, "error"),
    (DataError("no dialogues left", field="data.path"), errors.EXIT_BAD_INPUT, "error"),
])
def test_each_failure_kind_has_its_exit_code_and_one_line(monkeypatch, capsys, exc, code, word):
    monkeypatch.setattr(run_job, "run", _raise(exc))
    assert cli.main(["run", "--preset", "tiny", "--no-progress"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"detox-harness: {word}: ") and "Traceback" not in err
    assert exc.field in err


def test_the_exit_codes_are_distinct_and_a_training_failure_is_not_bad_input():
    codes = [errors.EXIT_PASS, errors.EXIT_BOUND_FAILED, errors.EXIT_BAD_INPUT, errors.EXIT_TRAINING_FAILED,
             errors.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)
    assert TrainingError("x").exit_code == errors.EXIT_TRAINING_FAILED != HarnessError("x").exit_code


def _results(cfg, before_tox, after_tox, references=True):
    def evaluation(tox):
        rows = [{"prompt_index": i, "sample_index": 0, "seed": cfg.eval.seed + i, "query": f"q{i}",
                 "references": ["a summary"] if references else [], "response": "a summary", "toxicity": t,
                 "reward": 1.0 - t, "length": 3, "kl": 0.0, "second_toxicity": None}
                for i, t in enumerate(tox)]
        return EvalOutput(metrics=phase_metrics(rows, cfg), samples=rows)

    results, _ = build_results(cfg, evaluation(before_tox), evaluation(after_tox), run_id="t", training=None,
                               timings={}, device="cpu")
    return results


def test_summary_table_shows_an_undefined_improvement_instead_of_crashing():
    cfg = copy.deepcopy(load_config("tiny"))
    cfg.eval.bootstrap_resamples = 50
    results = _results(cfg, [0.0, 0.0, 0.0], [0.1, 0.0, 0.2])  # before 0: the relative change is undefined
    assert relative_improvement(0.0, 0.1) is None and results["metrics"]["comparison"]["mean_improvement"] is None
    table = summary_table(results)
    assert f"mean toxicity improvement: {NOT_MEASURED}" in table


def test_summary_table_without_references_shows_rouge_as_not_measured():
    cfg = copy.deepcopy(load_config("tiny"))
    cfg.eval.bootstrap_resamples = 50
    results = _results(cfg, [0.5, 0.2, 0.9], [0.1, 0.0, 0.2], references=False)
    assert results["metrics"]["before"]["rougeL"] is None
    rouge = next(line for line in summary_table(results).splitlines() if line.startswith("ROUGE-L"))
    assert rouge.split("  ")[1:] == [NOT_MEASURED] * 2 or rouge.split()[1:] == NOT_MEASURED.split() * 2
    assert phase_line(results["metrics"]["before"]).endswith(f"ROUGE-L {NOT_MEASURED}")  # the line run() prints


def test_library_noise_is_kept_off_the_terminal_while_models_load(caplog):
    # offline, huggingface_hub warns on every retry (twenty lines before the harness's one-line error), and
    # transformers notices rows longer than a model's limit that the harness truncates itself
    import logging

    from transformers.utils import logging as hf_logging

    from harness.models import quiet_libraries

    hub = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING):
        with quiet_libraries():
            hub.warning("Retrying in 1s [Retry 1/5]")
            hf_logging.get_logger("transformers.tokenization_utils_base").warning("(539 > 512) indexing errors")
        assert "Retry" not in caplog.text and "indexing errors" not in caplog.text
        hub.warning("after the block: shown")
    assert "after the block: shown" in caplog.text


@pytest.fixture
def progress_bars():
    """Whatever a test sets, transformers' and the hub's bars are as before afterwards."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    yield
    hf_logging.enable_progress_bar() if before[0] else hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars() if before[1] else hub_utils.enable_progress_bars()


@pytest.mark.parametrize("progress", [True, False])
def test_loading_a_model_draws_no_weight_loading_bar(progress_bars, capfd, progress):
    """The demo once drew a 'Loading weights' bar per model loaded (seven); the hub's download bars stay on
    unless --no-progress."""
    from pathlib import Path

    from huggingface_hub import utils as hub_utils
    from transformers import AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    from harness.models import load_pretrained

    hf_logging.enable_progress_bar()  # as a fresh process starts
    cli._quiet_libraries(verbose=False, progress=progress)
    capfd.readouterr()
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "model"
    load_pretrained(AutoModelForSeq2SeqLM, str(fixture), field="policy.model", what="seq2seq model")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hub_utils.are_progress_bars_disabled() is (not progress)
