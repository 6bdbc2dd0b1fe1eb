"""One-line errors (``harness.errors``) and offline mode (``harness.models``): an offline load fails at once,
with a hard timeout so that a regression (a retried network call) fails instead of hanging the suite."""

from __future__ import annotations

import contextlib
import signal

import pytest

from harness.config import PolicyConfig
from harness.errors import HarnessError, ModelLoadError


def test_harness_errors_are_one_line():
    e = HarnessError("first line\nsecond line\r\nthird", field="data.path", value="a\nb", fix="do\nthis")
    assert "\n" not in str(e) and "\r" not in str(e)
    assert str(e).startswith("data.path: first line second line third")
    assert "(got 'a\\nb')" in str(e) and str(e).endswith("; do this")


def test_hub_offline_is_honoured_when_set_late_and_restored(monkeypatch):
    import huggingface_hub.constants as hub

    from harness.models import hub_offline

    before = hub.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with hub_offline():
        assert hub.HF_HUB_OFFLINE is True
    assert hub.HF_HUB_OFFLINE == before
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with hub_offline():
        assert hub.HF_HUB_OFFLINE == before


@contextlib.contextmanager
def hard_timeout(seconds: int):
    """Fail the test after ``seconds`` (SIGALRM: it interrupts a sleep or a blocking socket call between retries)
    instead of letting it hang the suite; pytest-timeout is not a dependency."""
    def expire(signum, frame):
        pytest.fail(f"still running after {seconds} s: the offline load is retrying instead of failing at once")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


OFFLINE_LIMIT_S = 60  # an offline miss takes well under a second; a network retry loop takes minutes


def test_offline_load_error_is_raised_at_once(monkeypatch):
    from harness.models import load_policy
    from harness.toxicity import Classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (lambda: load_policy(PolicyConfig(model="no-such-org/no-such-model")),
                 lambda: Classifier.load("no-such-org/no-such-model")):
        with hard_timeout(OFFLINE_LIMIT_S), pytest.raises(ModelLoadError) as e:
            load()
        assert e.value.field in ("policy.model", "reward.model") and "local" in str(e.value)
