"""Faults a user meets, through the CLI (in-process): each exits with its code, prints one line (no
traceback) and loses nothing already written. The exit-code table is the README's and harness/errors.py's.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_cli import run_cli

from harness import results as rf
from harness.config import load_config
from harness.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED

pytestmark = pytest.mark.integration

SHORT = ["--no-progress", "--no-report", "ppo.steps=4", "ppo.checkpoint_every=2", "eval.num_samples=16"]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def out(report_dir) -> Path:
    return report_dir / f"fault-{time.time_ns()}"


def test_an_output_path_that_cannot_be_created_is_bad_input():
    code, _, err = run_cli(["run", "--preset", "tiny", *SHORT, "output.dir=/proc/forbidden"])
    assert code == EXIT_BAD_INPUT
    assert "creating the run directory /proc/forbidden" in one_line(err)


def test_an_output_that_is_a_file_is_refused_and_left_alone(out):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("my notes")
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    assert code == EXIT_BAD_INPUT and "--output" in one_line(err) and "is a file" in err
    assert out.read_text() == "my notes"


def test_a_binary_config_file_is_bad_input(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_bytes(bytes(range(256)))
    code, _, err = run_cli(["run", "--preset", "tiny", "--config", str(path), *SHORT])
    assert code == EXIT_BAD_INPUT and "--config" in one_line(err) and "not a text" in err


def test_a_failed_input_leaves_no_stub_directory(out):
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT, "policy.model=/nonexistent/t5"])
    assert code == EXIT_BAD_INPUT and "policy.model" in one_line(err)
    assert not out.exists()


def test_a_failed_input_leaves_no_new_parent_directories(tmp_path):
    out = tmp_path / "nightly" / "2026" / "run"
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT, "policy.model=/nonexistent/t5"])
    assert code == EXIT_BAD_INPUT and "policy.model" in one_line(err)
    assert list(tmp_path.iterdir()) == []  # not even the "nightly/2026" it created on the way


def test_sigterm_outside_ppo_steps_exits_130_with_one_line(monkeypatch):
    """A scheduler's SIGTERM while the run loads or evaluates (no PPO step to finish) exits 130 like Ctrl-C."""
    import os
    import signal

    from harness import cli

    def killed_while_loading(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.COMMANDS, "presets", killed_while_loading)
    code, _, err = run_cli(["presets"])
    assert code == EXIT_INTERRUPTED and one_line(err) == "detox-harness: interrupted"
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handler is gone once main returns


def test_a_run_log_the_disk_refuses_is_dropped_quietly(tmp_path, capsys):
    """A full disk while a warning is logged to run.log: no logging traceback on the terminal."""
    import errno as _errno
    import logging

    from harness.rundir import RunLog

    class FullDisk:
        def write(self, text):
            raise OSError(_errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    with RunLog(tmp_path) as handler:
        handler.stream = FullDisk()
        try:
            logging.getLogger("harness.test").warning("a warning the disk cannot take")
        finally:
            handler.stream = None
    assert "Logging error" not in capsys.readouterr().err and handler.failed == 1


def test_a_read_only_run_directory_is_bad_input_without_a_resume_that_cannot_work(out, monkeypatch):
    # root ignores file modes, so the file system's refusal is planted where the run first writes
    from harness.config import HarnessConfig

    def read_only(self, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(HarnessConfig, "save", read_only)
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "not writable" in line and "Read-only file system" in line
    assert "--resume" not in line  # nothing was done that a resume would keep


def test_report_on_a_read_only_run_is_bad_input_and_keeps_its_files(tmp_path, monkeypatch):
    from harness.report import render
    from harness.report.demo import write_demo_run

    run_dir = write_demo_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(render, "atomic_write_text", read_only)
    code, _, err = run_cli(["report", str(run_dir)])
    assert code == EXIT_BAD_INPUT and "not writable" in one_line(err)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_an_unexpected_exception_is_one_line_with_the_traceback_in_the_run_log(out, monkeypatch):
    from harness import evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(evaluation, "evaluate_policy", broken)
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    line = one_line(err)
    assert code == EXIT_INTERNAL and "RuntimeError: planted bug" in line and "bug" in line
    log = out / rf.LOG_FILE
    assert str(log) in line
    assert "Traceback" in log.read_text() and "planted bug" in log.read_text()


def test_a_full_disk_at_a_checkpoint_names_the_last_one_and_resuming_finishes(out, monkeypatch):
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))  # a path, or the file object the checkpoint writes through
        if name.endswith("optimizer.pt") and "step-000004" in name:
            raise Exception("No space left on device (os error 28)")  # as safetensors reports it
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", disk_full_at_step_4)
        code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "no space left on the device" in line
    assert "last checkpoint" in line and "step-000002" in line and f"--output {out} --resume" in line
    kept = out / rf.CHECKPOINTS_DIR / "step-000002"
    assert (kept / "trainer_state.json").is_file()
    assert not [p for p in (out / rf.CHECKPOINTS_DIR).iterdir() if p.name != "step-000002"]  # no half-written one
    assert len(rf.read_jsonl(out / rf.TRAIN_STATS_FILE)) == 4  # every finished step's statistics kept
    # after freeing space: the run resumes from step 2 and finishes
    code, stdout, err = run_cli(["run", "--preset", "tiny", "--output", str(out), "--resume", "--no-progress"])
    assert code in (0, 1), err
    assert "resumed from" in stdout and rf.is_finished(out)
    assert [r["step"] for r in rf.read_jsonl(out / rf.TRAIN_STATS_FILE)] == [1, 2, 3, 4]


def test_a_policy_without_tokenizer_files_is_bad_input(out, tmp_path):
    """The tiny policy with its tokenizer.json removed (its tokenizer_config.json kept): transformers builds an
    empty vocabulary from it; once one warning, a run on unknown tokens and exit 1 ("regression")."""
    import shutil

    from harness import tiny

    model = tmp_path / "policy"
    shutil.copytree(tiny.source_dir() / "policy", model)
    (model / "tokenizer.json").unlink()
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT, f"policy.model={model}"])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and line.startswith("detox-harness: error: policy.model: ")
    assert "no tokenizer vocabulary" in line and str(model) in line and "tokenizer.save_pretrained" in line
    assert not out.exists() and {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("code_,words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_at_any_write_is_an_environment_fault_naming_the_file(tmp_path, monkeypatch, code_, words):
    """Disk full (or quota exhausted) where report writes its page: exit 2, the file and the fix, nothing changed."""
    from harness.report import render
    from harness.report.demo import write_demo_run

    run_dir = write_demo_run(tmp_path / "run")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def disk_full(path, text):
        raise OSError(code_, "the disk refused", str(path))

    monkeypatch.setattr(render, "atomic_write_text", disk_full)
    code, _, err = run_cli(["report", str(run_dir)])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and words in line and "free space or choose --output on another disk" in line
    assert str(run_dir / "index.html") in line and "bug" not in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_library_error_raised_over_a_full_disk_is_not_called_a_bug(out, monkeypatch):
    """torch.save writing to a file object the disk refuses raises its own RuntimeError ("unexpected pos") while
    handling the OSError: the errno in the exception's context makes it an environment fault (2), not a bug (4)."""
    from harness import evaluation

    def written_into_a_full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")  # a plain write: the OSError has no file name
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(evaluation, "evaluate_policy", written_into_a_full_disk)
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "no space left on the device" in line and "bug" not in line
    assert "free space or choose --output on another disk" in line and str(out) in line


def _mount_tmpfs(where: Path, size: str) -> None:
    import subprocess

    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs (mounted when permitted, else the test is skipped), unmounted afterwards."""
    import shutil
    import subprocess

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    where = tmp_path / "tmpfs"
    _mount_tmpfs(where, "1m")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_report_on_a_really_full_disk_is_exit_2_and_changes_nothing(full_disk):
    """The issue's tmpfs, as a user meets it: the run's files fit, the new page does not."""
    from harness.report.demo import write_demo_run

    run_dir = write_demo_run(full_disk / "run")
    (full_disk / "run" / "index.html").unlink(missing_ok=True)
    with open(full_disk / "filler", "wb", buffering=0) as f:  # fill the rest of the disk, a page at a time
        with pytest.raises(OSError) as filled:
            while True:
                f.write(b"\0" * 4096)
    assert filled.value.errno == errno.ENOSPC
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = run_cli(["report", str(run_dir)])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "no space left on the device" in line, line
    assert "free space or choose --output on another disk" in line and str(run_dir) in line and "bug" not in line
    assert {p: p.read_bytes() for p in before} == before  # every file it found, byte for byte
    assert not (run_dir / "index.html").exists()


def test_a_checkpoint_on_a_really_full_disk_is_exit_2_and_keeps_what_was_written(full_disk):
    """The issue's row as a user met it (exit 4 'a bug' before): the first checkpoint (1.3 MB) does not fit the 1 MB
    disk; the run says so in one line with the resume command, and the files written before it stay readable."""
    out = full_disk / "run"
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "writing the checkpoint step-000002 failed: no space left" in line, line
    assert "free space or choose --output on another disk" in line and f"--output {out} --resume" in line
    assert rf.read_json(out / rf.BEFORE_FILE)["metrics"] and len(rf.read_jsonl(out / rf.TRAIN_STATS_FILE)) == 2
    assert [p.name for p in (out / rf.CHECKPOINTS_DIR).iterdir()] == []  # no half-written checkpoint
    assert not (out / rf.RESULTS_FILE).exists()


# ------------------------------------------------------------------------------------ the multi-process launcher

ROOT = Path(__file__).resolve().parents[2]


def cli_process(*args: str) -> subprocess.Popen:
    """``python -m harness.cli ARGS`` as a user starts it, in its own process group (so a failed test can stop
    the launcher's workers too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def communicate(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout}s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def test_num_processes_that_cannot_share_the_batch_is_refused_once_before_launching(tmp_path):
    """Once each of the 3 processes printed the error, after about 15 s of starting and loading."""
    out = tmp_path / "run"
    code, stdout, err = communicate(cli_process("run", "--preset", "tiny", "--no-progress", "--output", str(out),
                                                "--num-processes", "3"), timeout=120)
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and line.startswith("detox-harness: error: ppo.batch_size: got 32")
    assert "multiple of the number of processes (3)" in line and "--num-processes" in line
    assert not out.exists() and not stdout.strip()  # nothing started, nothing said about a run


@pytest.mark.parametrize("finished", [False, True], ids=["unshareable", "finished"])
def test_a_resumed_run_the_processes_would_refuse_is_refused_once_before_launching(tmp_path, finished):
    """``--resume`` with ``--num-processes``: the saved config's batch that 3 processes cannot share, or a finished
    run, is said once by the launcher (the plan's own refusal), not once per process after loading; nothing in
    the directory changes."""
    out = tmp_path / "run"
    out.mkdir()
    load_config("tiny", overrides=["ppo.steps=2"]).save(out / rf.CONFIG_FILE)
    if finished:
        (out / rf.RESULTS_FILE).write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, err = communicate(cli_process("run", "--resume", "--no-progress", "--output", str(out),
                                                "--num-processes", "3" if not finished else "2"), timeout=120)
    line = one_line(err)
    assert code == EXIT_BAD_INPUT
    if finished:
        assert line.startswith("detox-harness: error: --resume: the run is finished"), line
    else:
        assert line.startswith("detox-harness: error: ppo.batch_size: got 32"), line
        assert "multiple of the number of processes (3)" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not stdout.strip()


def test_sigterm_to_the_two_process_launcher_exits_130_with_one_message(tmp_path):
    """A scheduler stops ``run --num-processes 2``: once exit 143 (accelerate's 128 + 15) with torch's own warning;
    now 130 like one process, the step in flight finished and saved, and the interruption said once."""
    out = tmp_path / "run"
    proc = cli_process("run", "--preset", "tiny", "--no-progress", "--no-report", "--output", str(out),
                       "--num-processes", "2", "ppo.steps=50", "ppo.batch_size=8", "ppo.mini_batch_size=4",
                       "eval.num_samples=8", "eval.batch_size=8")
    stats = out / rf.TRAIN_STATS_FILE
    deadline = time.time() + 300
    try:
        while not (stats.exists() and stats.read_text().strip()):  # inside the training loop
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no PPO step within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # to the launcher alone, as `kill PID` does
        code, stdout, err = communicate(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == EXIT_INTERRUPTED, f"exit {code}:\n{err[-2000:]}"
    both = stdout + err
    assert "Traceback" not in both and "death signal" not in both and "error" not in both.lower(), err
    assert both.count("--resume") == 1 and stdout.count("interrupted") == 1 and "interrupted" not in err, both
    steps = len(rf.read_jsonl(stats))
    assert 1 <= steps < 50 and (out / rf.CHECKPOINTS_DIR / f"step-{steps:06d}").is_dir()  # the step was saved


# ------------------------------------------------------------------------------------ resume and --output

@pytest.fixture
def unfinished(out) -> Path:
    """A run directory as an interrupted run leaves it: its config and a checkpoints folder."""
    cfg = load_config("tiny", overrides=["ppo.steps=12", "eval.num_samples=16"])
    out.mkdir(parents=True)
    cfg.save(out / rf.CONFIG_FILE)
    (out / rf.CHECKPOINTS_DIR).mkdir()
    return out


def test_output_on_an_unfinished_run_without_resume_is_refused(unfinished):
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(unfinished), "--no-progress"])
    assert code == EXIT_BAD_INPUT and "unfinished run" in one_line(err) and "--resume" in err
    assert (unfinished / rf.CHECKPOINTS_DIR).is_dir()


@pytest.mark.parametrize("args", [["eval.num_samples=32"], ["ppo.learning_rate=1e-3", "ppo.steps=20"], ["--seed", "5"]])
def test_resume_refuses_settings_that_change_the_run(unfinished, args):
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(unfinished), "--resume", "--no-progress",
                            *args])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT and "--resume" in line
    refused = [a.split("=")[0] for a in args if "=" in a and not a.startswith("ppo.steps")] or ["seed"]
    assert all(key in line for key in refused)
    assert "ppo.steps" not in line.split("would change")[1].split(";")[0]  # ppo.steps may change on resume


def test_eval_into_an_unfinished_run_is_refused(unfinished):
    code, _, err = run_cli(["eval", "--preset", "tiny", "--output", str(unfinished), "--no-progress"])
    assert code == EXIT_BAD_INPUT and "--output" in one_line(err)
    assert not rf.is_finished(unfinished)


@pytest.mark.parametrize("content", ["", "- a list\n", "\x00\x01binary"])
def test_resume_with_a_broken_config_yaml_is_bad_input(unfinished, content):
    (unfinished / rf.CONFIG_FILE).write_text(content)
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(unfinished), "--resume", "--no-progress"])
    assert code == EXIT_BAD_INPUT and "config.yaml cannot be read" in one_line(err)


def test_version(capsys):
    from importlib.metadata import version

    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"detox-harness {version('detox-harness')}"


# ------------------------------------------------------------------------------------ a corrupt checkpoint

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (copied per test, made unfinished there)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    code, _, err = run_cli(["run", "--preset", "tiny", "--output", str(out), *SHORT])
    assert code in (0, 1), err  # 1: a bound failed after 4 steps, not what is tested here
    return out


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _checksums(directory: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "value_head.safetensors",
                                  "rng_state.safetensors", "trainer_state.json"])
def test_resume_from_a_checkpoint_with_a_corrupt_file_is_bad_input_naming_it(checkpointed, tmp_path, name):
    """Issue 27: whichever file of the newest checkpoint is cut short, --resume exits 2 with one line naming the
    file and the fix; it neither trains on (exit 3) nor falls back silently to the checkpoint before it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    (run / rf.RESULTS_FILE).unlink()  # an unfinished run, as a crash after the last checkpoint leaves it
    newest = run / rf.CHECKPOINTS_DIR / "step-000004"
    _cut_short(newest / name)
    before = _checksums(run / rf.CHECKPOINTS_DIR)
    code, _, err = run_cli(["run", "--output", str(run), "--resume", "--no-progress", "--no-report"])
    line = one_line(err)
    assert code == EXIT_BAD_INPUT, line
    assert str(newest / name) in line and f"delete {newest} to resume from the checkpoint before it" in line
    assert _checksums(run / rf.CHECKPOINTS_DIR) == before, "the checkpoints are left as they were"
    assert not rf.is_finished(run)
