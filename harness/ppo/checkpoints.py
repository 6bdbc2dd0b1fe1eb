"""The PPO trainer's checkpoints on disk: ``<output>/checkpoints/step-NNNNNN/``.

A checkpoint holds the adapter (safetensors; the whole model's weights for a policy without an adapter), the
value head, the optimizer (a weights-only ``torch.save``), torch's RNG state and ``trainer_state.json``: the
step, the KL controller, the score moments, the TRL quirks' state, Python's RNG state and the config.

:func:`save` writes it all into a temporary ``.step-NNNNNN-xxxx/`` directory, flushes it and renames it into
place, so a crash (even SIGKILL) at any point leaves the whole checkpoint or none; :func:`tidy` removes what a
crash left. :func:`latest_checkpoint` picks the newest ``step-NNNNNN`` directory that holds every file: a
checkpoint whose files are there but cannot be read (cut short, overwritten, or naming another step) is not
skipped in favour of an older one: :func:`load` refuses it, naming the file and the fix (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import HarnessError, environment_fault, first_line, no_space_left

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TEMP_RE = re.compile(r"^\.step-\d+-")  # a checkpoint being written (tempfile.mkdtemp prefix)
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
MODEL_FILES = (ADAPTER_FILE, "model.safetensors", "model.safetensors.index.json")  # one of them: the weights


def checkpoint_dir(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``directory`` (``step-NNNNNN``)."""
    return Path(directory) / f"{CHECKPOINT_PREFIX}{step:06d}"


def is_complete_checkpoint(path: str | Path) -> bool:
    """A ``step-NNNNNN`` directory holding every file a checkpoint has (whether they can be read is
    :func:`load`'s question: a corrupt one is refused there, not passed over)."""
    path = Path(path)
    if not CHECKPOINT_RE.match(path.name) or not path.is_dir():
        return False
    return (all((path / name).is_file() for name in (VALUE_HEAD_FILE, OPTIMIZER_FILE, STATE_FILE))
            and any((path / name).is_file() for name in MODEL_FILES))


def complete_checkpoints(directory: str | Path) -> dict[int, Path]:
    """The complete checkpoints under ``directory`` by step (temporary and incomplete directories never count)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {int(CHECKPOINT_RE.match(p.name).group(1)): p for p in directory.iterdir() if is_complete_checkpoint(p)}


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory``."""
    done = complete_checkpoints(directory)
    return done[max(done)] if done else None


def tidy(directory: Path) -> None:
    """Put back what a crash during :func:`save` left: a checkpoint parked aside by a same-step re-save is
    renamed back, and half-written temporary directories are removed."""
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):  # a crash between the two renames of a same-step re-save
        inner = p / p.name.split("-old-")[0].lstrip(".") if "-old-" in p.name else None
        if inner is not None and is_complete_checkpoint(inner) and not (directory / inner.name).exists():
            os.replace(inner, directory / inner.name)
    for p in directory.iterdir():
        if p.is_dir() and TEMP_RE.match(p.name):
            log.warning("removing half-written checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------ writing

def save(final: Path, policy, ppo_state, trainer_state: dict) -> None:
    """Write ``policy``'s trainable weights, ``ppo_state`` (a :class:`harness.ppo.step.PPOState`), the RNG
    states and ``trainer_state`` (step, bad steps, seed, config) as the checkpoint ``final``, atomically.

    A full disk or another refusal of the machine is an :class:`harness.errors.EnvironmentFault` (exit 2),
    with nothing left behind."""
    from safetensors.torch import save_file

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        policy.save_pretrained(tmp)
        with open(tmp / OPTIMIZER_FILE, "wb") as f:  # a file object: a full disk raises its OSError (errno 28)
            torch.save(ppo_state.optimizer.state_dict(), f)  # here, not torch's writer's "unexpected pos"
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / RNG_FILE))
        state = {**trainer_state, "kl_ctl": ppo_state.kl_ctl.state_dict(), "running": ppo_state.running.state_dict(),
                 "trl_quirks": ppo_state.quirks.state_dict(), "python_rng": _encode_random_state(random.getstate())}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last
        _fsync_tree(tmp)
        if final.exists():  # the same step again (e.g. saved at the end after a resume): swap, then drop
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a full disk as a plain Exception, torch.save as a RuntimeError
        if isinstance(e, OSError) or no_space_left(e):
            raise environment_fault(e, f"writing the checkpoint {final.name}") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    """Flush a freshly written directory to disk, so that a rename after it publishes whole files."""
    for p in [*directory.rglob("*"), directory]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------ reading

class CorruptCheckpoint(HarnessError):
    """A checkpoint's file that is there but cannot be used: bad input (exit 2), whichever file it is."""


@contextlib.contextmanager
def _reading(path: Path, name: str, what: str):
    """Any failure while reading ``path / name`` as one line naming that file and the fix."""
    file = path / name
    try:
        yield file
    except CorruptCheckpoint:
        raise
    except OSError as e:
        raise environment_fault(e, f"reading the checkpoint file {file}") from e
    except Exception as e:
        raise CorruptCheckpoint(f"the checkpoint file {file} ({what}) is corrupt or does not fit this run: "
                                f"{first_line(e)}", field="--resume",
                                fix=f"delete {path} to resume from the checkpoint before it, or start a new run") from e


def load_adapter(path: Path, policy) -> None:
    """The trained adapter of checkpoint ``path`` into ``policy`` (its weights only; the reference stays); a file
    that cannot be read is a :class:`CorruptCheckpoint` naming it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with _reading(path, ADAPTER_FILE, "the adapter's weights") as file:
        set_peft_model_state_dict(policy.model, load_file(str(file)))


def load(path: Path, policy, ppo_state) -> dict:
    """Load the checkpoint ``path`` into ``policy`` and ``ppo_state`` and restore the RNG states; returns its
    ``trainer_state.json``. A file that cannot be read or used is a :class:`CorruptCheckpoint` naming it."""
    from safetensors.torch import load_file

    with _reading(path, STATE_FILE, "the trainer's state") as file:
        state = json.loads(file.read_text())
        m = CHECKPOINT_RE.match(path.name)
        if not isinstance(state, dict) or state.get("step") != int(m.group(1)):
            raise ValueError(f"it names step {state.get('step') if isinstance(state, dict) else None!r}, "
                             f"not {int(m.group(1))}")
        python_rng = _decode_random_state(state["python_rng"])
        for key in ("kl_ctl", "running", "trl_quirks"):
            if not isinstance(state[key], dict):
                raise ValueError(f"{key} is not a mapping")
    if policy.is_peft:
        load_adapter(path, policy)
    else:
        with _reading(path, "model.safetensors", "the model's weights"):
            from transformers import AutoModelForSeq2SeqLM

            policy.model.load_state_dict(AutoModelForSeq2SeqLM.from_pretrained(path).state_dict())
    with _reading(path, VALUE_HEAD_FILE, "the value head's weights"):
        policy.load_value_head(path, field="--resume")
    with _reading(path, OPTIMIZER_FILE, "the optimizer's state") as file:
        ppo_state.optimizer.load_state_dict(torch.load(file, weights_only=True))
    with _reading(path, RNG_FILE, "torch's random state") as file:
        torch.set_rng_state(load_file(str(file))["torch_rng"])
    with _reading(path, STATE_FILE, "the trainer's state"):
        ppo_state.kl_ctl.load_state_dict(state["kl_ctl"])
        ppo_state.running.load_state_dict(state["running"])
        ppo_state.quirks.load_state_dict(state["trl_quirks"])
        int(state["step"]), int(state["bad_steps"])
    random.setstate(python_rng)
    return state


def _encode_random_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random_state(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
