"""The project's exception types.

Every error a user can cause (bad config, bad data, a model that cannot be found, ...) is a
:class:`HarnessError`: one line that names the field, the bad value and the fix. The CLI prints it
without a traceback and exits with the class's ``exit_code`` (2, or 3 for a :class:`TrainingError`).
"""

from __future__ import annotations

import errno as _errno

# The command line's exit codes (README: "Exit codes"); one table for the CLI and the jobs.
EXIT_PASS = 0  # every bound holds
EXIT_BOUND_FAILED = 1  # the run finished and a bound failed: a model regression
EXIT_BAD_INPUT = 2  # bad settings, data, models or paths: nothing about the model's quality
EXIT_TRAINING_FAILED = 3  # training could not go on (e.g. too many non-finite steps)
EXIT_INTERNAL = 4  # an unexpected exception (a bug): one line on the terminal, the traceback in a log file
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: a checkpoint was written, --resume continues


class HarnessError(ValueError):
    """A user-facing error: ``field`` names what is wrong, ``fix`` says what to do."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, field: str | None = None, value=None, fix: str | None = None):
        self.field = field
        self.value = value
        self.fix = fix
        parts = []
        if field:
            parts.append(f"{one_line(str(field)[:4 * FIELD_LIMIT], FIELD_LIMIT)}: ")
        parts.append(message)
        if value is not None and "got" not in message:
            parts.append(f" (got {brief(value, PATH_LIMIT)})")  # a path, usually: longer, but bounded too
        if fix:
            parts.append(f"; {fix}")
        # one line, always: the CLI prints the message as is, and a log line must stay a line
        super().__init__(one_line("".join(parts)))


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` with every line break (and run of whitespace around it) turned into one space."""
    out = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if limit is not None and len(out) > limit:
        out = out[: limit - 3].rstrip() + "..."
    return out


#: the most characters an error shows of a value, or of a field name read from a file (a YAML key)
VALUE_LIMIT = 80
FIELD_LIMIT = 80
PATH_LIMIT = 300


def brief(value, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (ending in "..."), in time bounded by ``limit`` too: a
    message never echoes a whole file's worth of a value, nor expands a nested one (reprlib shows a few items per
    level and a few levels), nor converts a thousand-digit integer to text."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"<an integer of {value.bit_length()} bits>"
    else:
        text = _BRIEF.repr(value)
    return one_line(text, limit)


def _brief_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = PATH_LIMIT + 2
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 6, 6, 6
    return r


_BRIEF = _brief_repr()


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The most useful one-line description of ``exc``: its first line, or its type when it has no text."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return one_line(line, limit)


class ConfigError(HarnessError):
    """A setting is unknown, out of range or inconsistent with another."""


class DataError(HarnessError):
    """The dialogue data cannot be read or leaves nothing to train or evaluate on."""


class ModelLoadError(HarnessError):
    """A model, tokenizer or adapter cannot be found or does not fit the rest of the run."""


class EnvironmentFault(HarnessError):
    """The machine refused: a path that cannot be created or written, a full disk, a read-only file system."""


#: the errnos of a write the disk has no room for: no space left, or the user's quota exhausted
DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})
DISK_FULL_FIX = "free space or choose --output on another disk"


def no_space_left(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk: an OSError with a disk-full errno in its chain (:func:`disk_full_error`), or a
    library's own text for one that kept no OSError (safetensors: "No space left on device (os error 28)";
    torch.save: "PytorchStreamWriter failed writing file ...: file write failed")."""
    if disk_full_error(exc) is not None:
        return True
    lower = first_line(exc).lower()
    return "no space left" in lower or "os error 28" in lower or "file write failed" in lower


def disk_full_error(exc: BaseException | None) -> OSError | None:
    """The OSError with a disk-full errno (ENOSPC, EDQUOT) that ``exc`` is or was raised from or while handling
    (``__cause__``, ``__context__``), or None. A library that turns a failed write into its own exception (torch's
    "unexpected pos" RuntimeError when its file object raised) keeps the OSError in its context: the errno decides,
    not the library's words."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 32:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def environment_fault(exc: BaseException, action: str, path=None) -> EnvironmentFault:
    """One line for an OSError (or a library's "No space left on device") while ``action`` (e.g. "writing
    checkpoints/step-000010"): what failed, why, and what to do. A full disk names the file it refused (the
    OSError's, else ``path``: where the command writes)."""
    full = disk_full_error(exc)
    code = getattr(exc, "errno", None)
    text = first_line(exc)
    if full is not None:
        where = full.filename if full.filename is not None else path
        what = "disk quota exceeded" if full.errno == _errno.EDQUOT else "no space left on the device"
        why = what + (f" for {brief(str(where), PATH_LIMIT)}" if where is not None else "")
        fix = DISK_FULL_FIX
    elif no_space_left(exc):
        why, fix = "no space left on the device", DISK_FULL_FIX
    elif code == _errno.EROFS:
        why, fix = f"not writable ({text})", "choose a writable directory"
    elif code in (_errno.EACCES, _errno.EPERM):
        why, fix = f"permission denied ({text})", "fix the permissions or choose another path"
    elif code == _errno.EEXIST or isinstance(exc, FileExistsError):
        why, fix = f"a file is in the way ({text})", "give a directory path, or remove the file"
    elif code == _errno.ENOENT:
        why, fix = f"no such file or directory ({text})", "check the path"
    else:
        why, fix = text, "check the path, its permissions and the free space"
    return EnvironmentFault(f"{action} failed: {why}", fix=fix)


class TrainingError(HarnessError):
    """Training cannot go on (for example too many consecutive non-finite steps): exit status 3, not 2."""

    exit_code = EXIT_TRAINING_FAILED


class UnexpectedError(Exception):
    """An unexpected exception while a run ran (a bug, exit 4): ``cause`` is the exception itself,
    ``traceback_file`` where its traceback was written (None: not written yet), ``resume_hint`` how to continue
    the run (None: nothing to continue). The CLI prints one line of them."""

    def __init__(self, cause: BaseException, traceback_file: str | None = None, resume_hint: str | None = None):
        super().__init__(f"{type(cause).__name__}: {first_line(cause)}")
        self.cause = cause
        self.traceback_file = traceback_file
        self.resume_hint = resume_hint
