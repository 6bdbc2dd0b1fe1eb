"""The project's exception types.

Every error a user can cause (bad config, bad data, a model that cannot be found, ...) is a
:class:`HarnessError`: one line that names the field, the bad value and the fix. The CLI prints it
without a traceback and exits with status 2.
"""

from __future__ import annotations


class HarnessError(ValueError):
    """A user-facing error: ``field`` names what is wrong, ``fix`` says what to do."""

    def __init__(self, message: str, *, field: str | None = None, value=None, fix: str | None = None):
        self.field = field
        self.value = value
        self.fix = fix
        parts = []
        if field:
            parts.append(f"{field}: ")
        parts.append(message)
        if value is not None and "got" not in message:
            parts.append(f" (got {value!r})")
        if fix:
            parts.append(f"; {fix}")
        super().__init__("".join(parts))


class ConfigError(HarnessError):
    """A setting is unknown, out of range or inconsistent with another."""


class DataError(HarnessError):
    """The dialogue data cannot be read or leaves nothing to train or evaluate on."""


class ModelLoadError(HarnessError):
    """A model, tokenizer or adapter cannot be found or does not fit the rest of the run."""


class TrainingError(HarnessError):
    """Training cannot go on (for example too many consecutive non-finite steps)."""
