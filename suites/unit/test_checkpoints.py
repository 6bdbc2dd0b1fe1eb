"""The trainer's checkpoints (``harness.ppo.checkpoints``, through ``PPOTrainer``): ``latest_checkpoint`` never
picks a half-written one; ``resume`` removes temporary directories and drops a ``train_stats.jsonl`` row cut short
by a crash; a corrupt file in the newest checkpoint is bad input naming that file (exit 2), never a silent fall
back to an older checkpoint; a full disk while writing leaves nothing behind. The tiny-world trainer loop,
SIGKILL/SIGTERM and the CLI are in ``suites/integration/test_faults.py``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness.config import PolicyConfig, load_config
from harness.errors import EXIT_BAD_INPUT, EnvironmentFault, HarnessError
from suites.weights import trainable_state_dict

FX = Path(__file__).resolve().parents[2] / "fixtures" / "parity"


def _load_policy():
    from harness.models import load_policy

    torch.manual_seed(0)
    return load_policy(PolicyConfig(model=str(FX / "model"), adapter=str(FX / "adapter"), dtype="float32"))


def _differs(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


class _NoClassifier:
    pass


def _trainer(tmp_path: Path, policy=None):
    from harness.ppo.trainer import PPOTrainer

    cfg = load_config("tiny", overrides=["ppo.batch_size=8", "ppo.mini_batch_size=4"])
    return PPOTrainer(cfg, policy or _load_policy(), _NoClassifier(), list(range(16)), tmp_path)


def _write_stats(trainer, steps: int, tail: str = "") -> None:
    trainer.stats_path.write_text("".join(json.dumps({"step": s, "skipped": 0.0}) + "\n" for s in range(1, steps + 1))
                                  + tail)


def test_latest_checkpoint_never_picks_a_half_written_one(tmp_path):
    from harness.ppo.checkpoints import latest_checkpoint

    t = _trainer(tmp_path)
    t.step = 2
    good = t.save_checkpoint()
    ck = t.ckpt_dir
    # what a crash can leave: the temporary directory of a newer checkpoint ...
    shutil.copytree(good, ck / ".step-000004-k2j3h4")
    # ... a step directory without trainer_state.json (copied by hand, or half copied) ...
    shutil.copytree(good, ck / "step-000005")
    (ck / "step-000005" / "trainer_state.json").unlink()
    # ... one without weights
    shutil.copytree(good, ck / "step-000007")
    (ck / "step-000007" / "adapter_model.safetensors").unlink()
    # and names that only look like checkpoints
    (ck / "step-latest").mkdir()
    (ck / "step-000009.json").write_text("{}")
    assert latest_checkpoint(ck) == good
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_checkpoint_holds_only_safetensors_weights_and_a_weights_only_optimizer(tmp_path):
    t = _trainer(tmp_path)
    path = t.save_checkpoint()
    names = sorted(p.name for p in path.iterdir())
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "optimizer.pt",
            "rng_state.safetensors", "trainer_state.json"} <= set(names)
    pickles = [n for n in names if re.search(r"\.(bin|pt|pth|pkl|pickle|ckpt)$", n) and n != "optimizer.pt"]
    assert pickles == [], pickles
    torch.load(path / "optimizer.pt", weights_only=True)  # loads without unpickling arbitrary objects
    assert not list(t.ckpt_dir.glob(".step-*")), "the temporary directory was renamed, not left behind"


def test_resume_cleans_up_and_drops_a_row_cut_short(tmp_path):
    t = _trainer(tmp_path)
    t.step = 3
    saved = trainable_state_dict(t.policy)
    path = t.save_checkpoint()
    shutil.copytree(path, t.ckpt_dir / ".step-000004-abcdef")  # killed while writing step 4's checkpoint
    _write_stats(t, 5, tail='{"step": 6, "env/rew')  # killed while appending step 6's row
    with torch.no_grad():
        for p in t.policy.trainable_parameters():
            p.add_(1.0)

    again = _trainer(tmp_path, policy=t.policy)
    assert again.resume() == path and again.step == 3
    assert _differs(saved, trainable_state_dict(again.policy)) == []
    rows = [json.loads(line) for line in again.stats_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not list(again.ckpt_dir.glob(".step-*"))


def test_resume_without_a_checkpoint_starts_over_with_an_empty_log(tmp_path):
    t = _trainer(tmp_path)
    _write_stats(t, 2, tail='{"st')  # killed before the first checkpoint
    assert t.resume() is None and t.step == 0
    assert t.stats_path.read_text() == ""


def test_resaving_a_step_replaces_the_checkpoint_whole(tmp_path):
    from harness.ppo.checkpoints import latest_checkpoint

    t = _trainer(tmp_path)
    t.step = 2
    first = t.save_checkpoint()
    state = json.loads((first / "trainer_state.json").read_text())
    t.bad_steps = 1
    assert t.save_checkpoint() == first
    assert json.loads((first / "trainer_state.json").read_text())["bad_steps"] == 1 != state["bad_steps"]
    assert latest_checkpoint(t.ckpt_dir) == first and not list(t.ckpt_dir.glob(".step-*"))


def test_a_crash_between_the_two_renames_of_a_resave_loses_nothing(tmp_path):
    t = _trainer(tmp_path)
    t.step = 2
    path = t.save_checkpoint()
    parked = t.ckpt_dir / ".step-000002-old-xyz"
    parked.mkdir()
    path.rename(parked / path.name)  # the old copy moved aside, the new one not yet renamed in
    again = _trainer(tmp_path, policy=t.policy)
    assert again.resume() == path and again.step == 2


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """The checkpoints of steps 2 and 4 of one trainer, and its policy (each test resumes a copy)."""
    run = tmp_path_factory.mktemp("two-checkpoints")
    t = _trainer(run)
    for t.step in (2, 4):
        t.save_checkpoint()
    return run / "checkpoints", t.policy


def _resume_a_copy(two_checkpoints, tmp_path: Path, spoil) -> tuple[Path, object]:
    """Copy the checkpoints into ``tmp_path``, ``spoil(step-000004)``, resume there; (newest, the raised error)."""
    checkpoints, policy = two_checkpoints
    shutil.copytree(checkpoints, tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step-000004"
    spoil(newest)
    again = _trainer(tmp_path, policy=policy)
    with pytest.raises(HarnessError) as e:
        again.resume()
    assert again.step == 0, "nothing was taken from an older checkpoint"
    return newest, e.value


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "value_head.safetensors",
                                  "rng_state.safetensors", "trainer_state.json"])
def test_a_corrupt_file_in_the_newest_checkpoint_is_bad_input_naming_it(two_checkpoints, tmp_path, name):
    """Whichever file of the newest checkpoint is cut short, resuming stops with exit 2 and one line naming that
    file and the fix; it never falls back to the older checkpoint silently (issue 27)."""
    def cut_short(newest: Path) -> None:
        path = newest / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    newest, error = _resume_a_copy(two_checkpoints, tmp_path, cut_short)
    message = str(error)
    assert error.exit_code == EXIT_BAD_INPUT and error.field == "--resume"
    assert str(newest / name) in message and "\n" not in message
    assert f"delete {newest} to resume from the checkpoint before it" in message


@pytest.mark.parametrize("state, says", [
    ('{"step": 6, "kl_', "Unterminated string"),  # cut short
    ('{"step": 2}', "names step 2, not 4"),  # another step's state
    ("[1, 2]", "names step None, not 4"),  # not a mapping
])
def test_a_trainer_state_that_cannot_be_used_is_refused_not_passed_over(two_checkpoints, tmp_path, state, says):
    newest, error = _resume_a_copy(two_checkpoints, tmp_path,
                                   lambda newest: (newest / "trainer_state.json").write_text(state))
    assert error.exit_code == EXIT_BAD_INPUT and str(newest / "trainer_state.json") in str(error)
    assert says in str(error)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),  # torch.save on a full disk
])
def test_a_failed_checkpoint_write_leaves_no_temporary_directory(tmp_path, monkeypatch, error):
    t = _trainer(tmp_path)

    def disk_full(*a, **k):
        raise error

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(EnvironmentFault) as e:  # exit 2 with one line, not a traceback
        t.save_checkpoint()
    assert "writing the checkpoint step-000000 failed: no space left on the device" in str(e.value)
    assert e.value.__cause__ is error
    assert list(t.ckpt_dir.iterdir()) == []
