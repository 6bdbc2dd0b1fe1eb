"""One owner per run directory, and refusals that change nothing (issue 27): every case is replayed through the CLI
(in-process) and asserts the exit code, the one line, and that every file already there is byte-identical."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_cli import run_cli

from harness import results as rf
from harness.errors import EXIT_BAD_INPUT, HarnessError
from harness.files import LOCK_FILE, DirectoryLock
from harness.report.demo import write_demo_run

pytestmark = pytest.mark.integration

SHORT = ["--no-progress", "ppo.steps=4", "ppo.checkpoint_every=2", "eval.num_samples=16"]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def checksums(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) and its SHA-256; directories as entries too."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(args: list[str], root: Path, *words: str) -> str:
    """Run the CLI; it must exit 2 with one line holding ``words`` and leave every file under ``root`` as it was."""
    before = checksums(root)
    code, _, err = run_cli(args)
    line = one_line(err)
    assert code == EXIT_BAD_INPUT, (code, err)
    for w in words:
        assert w in line, (w, line)
    assert checksums(root) == before, "a refused command changed files"
    return line


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint folder that the trainer counts as complete (its files, a trainer_state of its step)."""
    ckpt = run_dir / rf.CHECKPOINTS_DIR / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    for name in ("value_head.safetensors", "optimizer.pt", "adapter_model.safetensors"):
        (ckpt / name).write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


@pytest.fixture
def finished(tmp_path) -> Path:
    run = write_demo_run(tmp_path / "reports" / "finished-run")
    fake_checkpoint(run, 4)
    return run


def test_a_second_command_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    """Two runs into one directory: the second exits 2 at once naming the first; nothing of the first's changes."""
    out = tmp_path / "shared-run"
    out.mkdir()
    (out / rf.CONFIG_FILE).write_text("seed: 1\n")  # the first run's work in progress
    (out / rf.BEFORE_FILE).write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from harness.files import DirectoryLock; "
                               f"DirectoryLock({str(out)!r}, 'run').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(["run", "--preset", "tiny", "--output", str(out), *SHORT], tmp_path, "another command",
                       f"pid {holder.pid}", "(run")
        assert "--output" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    """kill -9 leaves the lock file behind but not the lock (the kernel releases an flock with its holder)."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, signal; from harness.files import DirectoryLock; "
                               f"DirectoryLock({str(out)!r}, 'run').acquire(); os.kill(os.getpid(), signal.SIGKILL)"])
    assert holder.wait() == -9 and (out / LOCK_FILE).is_file()
    lock = DirectoryLock(out, "report").acquire()
    try:
        assert lock.taken_over.startswith(f"pid {holder.pid} (run")
        with pytest.raises(HarnessError, match="another command is using this directory"):
            DirectoryLock(out, "run").acquire()  # while held, a second one is refused
    finally:
        lock.release()
    assert not (out / LOCK_FILE).exists()  # released: the directory is as it was found
    DirectoryLock(out, "run").acquire().release()


def test_sft_into_a_finished_run_is_refused_and_takes_nothing(finished, tmp_path):
    refused(["sft", "--preset", "tiny", "--no-progress", "--output", str(finished)], tmp_path, "--output",
            "holds a PPO run")


def test_sft_into_a_folder_of_other_files_is_refused(tmp_path):
    folder = tmp_path / "my-adapters"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")  # someone else's adapter
    refused(["sft", "--preset", "tiny", "--no-progress", "--output", str(folder)], tmp_path, "--output",
            "not a warm start")


def test_run_and_eval_into_a_folder_of_other_files_are_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    refused(["run", "--preset", "tiny", "--output", str(folder), *SHORT], tmp_path, "--output", "thesis.tex")
    refused(["eval", "--preset", "tiny", "--output", str(folder), "--no-progress"], tmp_path, "--output",
            "thesis.tex")


def test_report_never_replaces_a_page_it_did_not_write(finished, tmp_path):
    foreign = finished.parent / "index.html"
    foreign.write_text("<html>the team's own dashboard</html>")
    refused(["report", str(finished)], tmp_path, "index.html", "is not a report page of detox-harness")
    foreign.unlink()
    code, out, _ = run_cli(["report", str(finished)])  # its own pages it re-renders
    assert code == 0 and (finished.parent / "index.html").is_file()
    assert run_cli(["report", str(finished)])[0] == 0


def test_run_and_eval_refuse_before_running_when_the_history_page_is_foreign(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "index.html").write_text("<html>not ours</html>")
    refused(["run", "--preset", "tiny", "--output", str(reports / "new-run"), *SHORT], tmp_path, "index.html")
    refused(["eval", "--preset", "tiny", "--output", str(reports / "new-eval"), "--no-progress"], tmp_path,
            "index.html")
    assert sorted(p.name for p in reports.iterdir()) == ["index.html"]  # no run folder was made


def test_a_refused_resume_leaves_the_config_as_it_was(tmp_path):
    """The last checkpoint is at step 7; --resume ppo.steps=2 is refused, and a plain --resume still works on the
    same config.yaml afterwards (it used to say 2 steps from then on)."""
    from harness.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    load_config("tiny", overrides=["ppo.steps=8"]).save(run / rf.CONFIG_FILE)
    fake_checkpoint(run, 7)
    (run / rf.TRAIN_STATS_FILE).write_text("")
    line = refused(["run", "--preset", "tiny", "--output", str(run), "--resume", "--no-progress", "ppo.steps=2"],
                   tmp_path, "ppo.steps", "step 7")
    assert "ppo.steps=7 or more" in line


def test_resume_of_a_finished_run_is_refused_and_keeps_its_results(finished, tmp_path):
    refused(["run", "--preset", "tiny", "--output", str(finished), "--resume", "--no-progress"], tmp_path,
            "--resume", "finished")


def test_resume_with_sft_is_refused_instead_of_ignoring_sft(finished, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / rf.CONFIG_FILE).write_bytes((finished / rf.CONFIG_FILE).read_bytes())
    refused(["run", "--preset", "tiny", "--output", str(run), "--resume", "--sft", "--no-progress"], tmp_path,
            "--sft")


def test_baseline_force_regen_says_it_rewrites_the_file(tmp_path):
    runs = [write_demo_run(tmp_path / f"run-{seed}", seed=seed, strength=0.5 + 0.05 * seed) for seed in range(3)]
    target = tmp_path / "base.json"
    code, out, _ = run_cli(["baseline", "--output", str(target), "--from-runs", *map(str, runs)])
    assert code == 0 and "rewriting" not in out
    written = target.read_bytes()
    refused(["baseline", "--output", str(target), "--from-runs", *map(str, runs)], tmp_path, "--force-regen")
    assert target.read_bytes() == written
    code, out, _ = run_cli(["baseline", "--output", str(target), "--force-regen", "--from-runs", *map(str, runs)])
    assert code == 0 and f"rewriting {target}" in out


def test_the_lock_file_never_stays_behind_after_a_run(tmp_path):
    """A refused run (bad input while loading) releases its lock and removes the directory it made."""
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT, "policy.model=/nonexistent/t5"])
    assert code == EXIT_BAD_INPUT and not out.exists()
    out.mkdir()
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT, "policy.model=/nonexistent/t5"])
    assert code == EXIT_BAD_INPUT and list(out.iterdir()) == []  # the directory it did not make stays, empty
