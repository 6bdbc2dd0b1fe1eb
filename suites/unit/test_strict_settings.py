"""Settings files read safely and strictly, and names that cannot escape (issue 27, points 4 and 5).

Each case goes through ``harness.cli.main`` where practical and asserts the exit code, the one line on stderr
naming the field, and that the directories and files that existed before the refusal are byte-identical after
it. The YAML loader is the same for ``--config`` and for the ``config.yaml`` that ``--resume`` reads back.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import harness.jobs.run  # noqa: F401 - imported up front, so that timings below measure reading, not importing
from harness.cli import main
from harness.config import HarnessConfig, load_config, parse_override, parse_settings, read_settings
from harness.errors import EXIT_BAD_INPUT, ConfigError, brief

LAUGHS = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi")))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), and every directory (-> None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(argv: list[str], capsys, field: str) -> str:
    """Run the command line; assert exit 2 and one line on stderr naming ``field``; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"detox-harness: error: {field}: "), lines[0]
    return lines[0]


@pytest.fixture
def workspace(tmp_path):
    """A reports directory with a finished-looking history page and an existing run directory: what a refusal
    must leave alone."""
    reports = tmp_path / "reports"
    (reports / "old-run").mkdir(parents=True)
    (reports / "index.html").write_text("<html>history</html>\n")
    (reports / "old-run" / "results.json").write_text('{"run_id": "old-run"}\n')
    return tmp_path


def run_argv(workspace: Path, *extra: str) -> list[str]:
    return ["run", "--preset", "tiny", "--no-progress", f"output.dir={workspace / 'reports'}", *extra]


def saved_run(tmp_path: Path, edit) -> Path:
    """An interrupted run's directory whose config.yaml has been edited by ``edit(text) -> text``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("tiny")
    cfg.save(run_dir / "config.yaml")
    (run_dir / "config.yaml").write_text(edit((run_dir / "config.yaml").read_text()))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "train_stats.jsonl").write_text('{"step": 1}\n')
    return run_dir


# ------------------------------------------------------------------------------------------------ aliases

@pytest.mark.parametrize("body, field", [
    (LAUGHS + "ppo:\n  batch_size: *i\n", "b[0]"),  # the classic: refused at its first alias
    (LAUGHS.replace("\n", "\n  ").replace("a: &a", "ppo:\n  a: &a", 1).rstrip() + "\n  batch_size: *i\n",
     "ppo.b[0]"),
    ("ppo:\n  batch_size: [&a [lol, lol, lol], &b [*a, *a, *a], &c [*b, *b, *b]]\n", "ppo.batch_size[1][0]"),
    (LAUGHS + "output:\n  run_id: *i\n", "b[0]"),
    ("x: &x lol\noutput:\n  run_id: *x\n", "output.run_id"),  # even a harmless alias: one rule, said once
])
def test_an_alias_is_refused_at_once_naming_where_it_stands(workspace, capsys, body, field):
    f = workspace / "bomb.yaml"
    f.write_text(body)
    before = snapshot(workspace)
    start = time.perf_counter()
    line = refused(run_argv(workspace, "--config", str(f)), capsys, field)
    assert time.perf_counter() - start < 1.0
    assert "YAML alias" in line and "write the value itself" in line and "line " in line, line
    assert len(line) < 400, line
    assert snapshot(workspace) == before


def test_a_resumed_config_yaml_with_an_alias_bomb_is_refused_and_left_as_it_was(tmp_path, capsys):
    run_dir = saved_run(tmp_path, lambda text: LAUGHS + text.replace("  batch_size: 32", "  batch_size: *i"))
    before = snapshot(run_dir)
    start = time.perf_counter()
    line = refused(["run", "--preset", "tiny", "--no-progress", "--output", str(run_dir), "--resume"], capsys, "b[0]")
    assert time.perf_counter() - start < 1.0
    assert "config.yaml" in line, line
    assert snapshot(run_dir) == before


def test_the_saved_config_never_writes_aliases_and_reads_back_strictly(tmp_path):
    cfg = load_config("tiny", overrides=["ppo.learning_rate=1e-5", "thresholds.max_kl=1e1"])
    cfg.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "&" not in text and "*id" not in text
    assert read_settings(tmp_path / "config.yaml", "--output") == cfg.to_dict()


# ------------------------------------------------------------------------------------------- duplicate keys

def test_a_second_section_block_is_refused_naming_the_key_and_both_lines(workspace, capsys):
    f = workspace / "c.yaml"
    f.write_text("ppo:\n  steps: 3\noutput:\n  report: false\nppo:\n  batch_size: 16\n")
    before = snapshot(workspace)
    line = refused(run_argv(workspace, "--config", str(f)), capsys, "ppo")
    assert "duplicate key on line 5 (first on line 1)" in line and str(f) in line, line
    assert "write each key once" in line
    assert snapshot(workspace) == before


@pytest.mark.parametrize("body, field, lines", [
    ("ppo:\n  steps: 3\n  learning_rate: 1.0e-4\n  steps: 4\n", "ppo.steps", (4, 2)),
    ("thresholds:\n  max_kl: 10\n  max_kl: 100\n", "thresholds.max_kl", (3, 2)),
    ("seed: 1\nseed: 2\n", "seed", (2, 1)),
    ("policy:\n  lora_target_modules: [q, v]\n  lora_target_modules:\n    - k\n", "policy.lora_target_modules", (3, 2)),
])
def test_a_duplicate_key_at_any_depth_is_refused(tmp_path, body, field, lines):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    assert e.value.field == field
    assert f"duplicate key on line {lines[0]} (first on line {lines[1]})" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_resumed_config_yaml_with_a_duplicate_section_is_refused_and_left_as_it_was(tmp_path, capsys):
    run_dir = saved_run(tmp_path, lambda text: text + "ppo:\n  steps: 2\n")
    before = snapshot(run_dir)
    line = refused(["run", "--preset", "tiny", "--no-progress", "--output", str(run_dir), "--resume"], capsys, "ppo")
    assert "duplicate key" in line and "config.yaml" in line, line
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("text", ["1e-3", "1E-3", "5e2", "-2.5e-4", "1.5e+2", "3.e1", ".5e-1", "1_0e1"])
def test_a_number_with_an_exponent_reads_in_yaml_as_on_the_command_line(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(f"ppo:\n  target: {text}\n")
    from_file = load_config("tiny", f).ppo.target if not text.startswith("-") else parse_settings(
        f.read_text(), "c.yaml", "--config")["ppo"]["target"]
    from_line = parse_override(f"ppo.target={text}")[1]
    assert isinstance(from_file, float) and from_file == from_line == float(text.replace("_", ""))


def test_the_learning_rate_of_the_issue_loads_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  learning_rate: 1e-3\nsft:\n  learning_rate: 2E-4\nthresholds:\n  max_kl: 1.5e1\n")
    cfg = load_config("tiny", f)
    assert (cfg.ppo.learning_rate, cfg.sft.learning_rate, cfg.thresholds["max_kl"]) == (1e-3, 2e-4, 15.0)


def test_an_exponent_for_an_integer_field_is_refused_in_both_places(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  steps: 5e2\n")
    for call in (lambda: load_config("tiny", f), lambda: load_config("tiny", overrides=["ppo.steps=5e2"])):
        with pytest.raises(ConfigError) as e:
            call()
        assert e.value.field == "ppo.steps" and "accepted: an integer" in str(e.value)


def test_words_and_versions_stay_text(tmp_path):
    data = parse_settings("a: e5\nb: 1e\nc: 1.2.3\nd: 0x1e3\ne: '1e-3'\n", "c.yaml", "--config")
    assert data == {"a": "e5", "b": "1e", "c": "1.2.3", "d": 0x1e3, "e": "1e-3"}


# ------------------------------------------------------------------------------------ bounded messages

@pytest.mark.parametrize("body, field, run", [
    ("ppo:\n  batch_size: " + "x" * 200_000 + "\n", "ppo.batch_size", "x" * 100),
    ("ppo:\n  batch_size: [" + ", ".join(["[" + ", ".join(["lol"] * 40) + "]"] * 40) + "]\n", "ppo.batch_size",
     "lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol"),
    ("ppo:\n  learning_rate: {" + ", ".join(f"k{i}: v" for i in range(1000)) + "}\n", "ppo.learning_rate", "k999"),
    ("preset: " + "p" * 100_000 + "\n", "preset", "p" * 100),
    ("thresholds:\n  max_kl: " + "z" * 100_000 + "\n", "thresholds.max_kl", "z" * 100),
    # a key is a field name: cut to 80 characters too (YAML keys stop at 1024)
    ("ppo:\n  " + "k" * 1000 + ": 1\n", "ppo." + "k" * 73 + "...", "k" * 100),
    ("seed: " + "9" * 5000 + "\n", "--config", "9" * 100),  # more digits than Python converts: exit 2, no crash
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "--config", "[" * 100),  # deeper than the parser recurses
])
def test_an_error_never_echoes_an_unbounded_value(workspace, capsys, body, field, run):
    f = workspace / "c.yaml"
    f.write_text(body)
    before = snapshot(workspace)
    start = time.perf_counter()
    line = refused(run_argv(workspace, "--config", str(f)), capsys, field)
    assert time.perf_counter() - start < 2.0
    assert run not in line, line[:300]
    assert len(line) < 2500, line[:300]  # (an unknown key with no near match lists the known keys)
    assert snapshot(workspace) == before


def test_a_settings_file_of_megabytes_is_not_parsed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    assert e.value.field == "--config" and "not a settings file" in str(e.value)


def test_brief_cuts_values_to_80_characters_with_an_ellipsis():
    assert brief("x" * 1000).endswith("...") and len(brief("x" * 1000)) == 80
    assert brief(10 ** 5000) == "<an integer of 16610 bits>"
    assert len(brief([[list(range(1000))] * 1000] * 1000)) <= 80
    assert brief("ok") == "'ok'"


# ------------------------------------------------------------------------------------------------- names

BAD_NAMES = {".": "names a directory itself", "..": "names a directory itself", "a/b": "path separator",
             "../escape": "path separator", "a\\b": "path separator", "x\ny": "control character",
             "tab\there": "control character", "\x7f": "control character", "n" * 300: "longer than 255 bytes"}


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_a_run_id_that_is_not_one_plain_name_is_refused(workspace, capsys, name):
    before = snapshot(workspace)
    line = refused(run_argv(workspace, f"output.run_id={name}"), capsys, "output.run_id")
    assert BAD_NAMES[name] in line and "give one plain name" in line, line
    assert snapshot(workspace) == before


@pytest.mark.parametrize("value, why", [("''", "is empty"), ("'  '", "is empty"), ("'..'", "names a directory"),
                                        ('"a/b"', "path separator"), ('"x\\ty"', "control character")])
def test_a_run_id_from_a_yaml_file_is_checked_alike(workspace, capsys, value, why):
    f = workspace / "c.yaml"
    f.write_text(f"output:\n  run_id: {value}\n")
    before = snapshot(workspace)
    line = refused(run_argv(workspace, "--config", str(f)), capsys, "output.run_id")
    assert why in line, line
    assert snapshot(workspace) == before


def test_a_resumed_config_yaml_with_an_escaping_run_id_is_refused(tmp_path, capsys):
    run_dir = saved_run(tmp_path, lambda text: text.replace("run_id: null", "run_id: ../../elsewhere"))
    before = snapshot(run_dir)
    line = refused(["run", "--preset", "tiny", "--no-progress", "--output", str(run_dir), "--resume"], capsys,
                   "output.run_id")
    assert "path separator" in line, line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["my-run", "run.2026-01-01", "Ünïcode run", ".hidden"])
def test_plain_run_ids_are_accepted(name):
    assert load_config("tiny", overrides=[f"output.run_id={name}"]).output.run_id == name


@pytest.mark.parametrize("output, why", [(".", "names a directory itself"), ("..", "names a directory itself"),
                                         ("sub/..", "names a directory itself"), ("", "is empty"),
                                         ("sub/", "is empty"), ("sub", "is a directory"),
                                         ("x\n.json", "control character")])
def test_a_baseline_output_that_is_not_a_file_name_is_refused(tmp_path, capsys, monkeypatch, output, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "keep.json").write_text("{}\n")
    before = snapshot(tmp_path)
    line = refused(["baseline", "--preset", "tiny", "--seeds", "0,1,2", "--output", output], capsys, "--output")
    assert why in line, line
    assert snapshot(tmp_path) == before


def test_a_baseline_from_runs_checks_the_preset_that_names_its_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = refused(["baseline", "--preset", "../../x", "--from-runs", str(tmp_path)], capsys, "--preset")
    assert "unknown preset" in line, line
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent.parent / "x.json").exists()


def test_the_default_config_has_no_run_id_and_validates():
    assert HarnessConfig().output.run_id is None
