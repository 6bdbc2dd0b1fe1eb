"""Security rules over the package's source (issue 7): ruff's bandit rules (``S``, configured in pyproject.toml
and run by ``make test``) catch shell commands, eval/exec, pickle and unsafe YAML; what they cannot see
(``torch.load`` without ``weights_only=True``, a literal ``trust_remote_code=True``, weights saved as pickles)
is checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.config import PolicyConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "harness"
FX = REPO / "fixtures" / "parity"

def _sources() -> list[tuple[Path, str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(f, f.read_text()) for f in files]


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call ``name(...)`` (balanced parentheses, across lines)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def test_no_trust_remote_code_literal():
    bad = [f"{f.relative_to(REPO)}" for f, text in _sources()
           if re.search(r"trust_remote_code\s*=\s*True", text)]
    assert bad == []


def test_trust_remote_code_is_passed_from_the_config(monkeypatch):
    """Every from_pretrained of the policy and classifier gets the config's trust_remote_code (False by default)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from harness.models import load_policy

    seen = []
    for cls in (AutoModelForSeq2SeqLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **kw):
            seen.append(kw.get("trust_remote_code", "absent"))
            return _real(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_policy(PolicyConfig(model=str(FX / "model"), dtype="float32"))
    assert seen and all(v is False for v in seen), seen


def test_every_torch_load_is_weights_only():
    calls = [(f, args) for f, text in _sources() for args in _calls(text, "torch.load")]
    assert calls, "expected the optimizer state to be loaded with torch.load"
    bad = [f"{f.relative_to(REPO)}: torch.load({args})" for f, args in calls if "weights_only=True" not in args]
    assert bad == []


PLANTED_INSECURE = {
    "S307": "def f(text):\n    return eval(text)\n",
    "S102": "def f(code):\n    exec(code)\n",
    "S602": "import subprocess\n\n\ndef f(cmd):\n    subprocess.run(cmd, shell=True)\n",
    "S605": "import os\n\n\ndef f(cmd):\n    os.system(cmd)\n",
    "S301": "import pickle\n\n\ndef f(blob):\n    return pickle.loads(blob)\n",
    "S506": "import yaml\n\n\ndef f(text):\n    return yaml.load(text, Loader=yaml.Loader)\n",
}


@pytest.mark.parametrize("code", sorted(PLANTED_INSECURE))
def test_the_lint_configuration_catches_planted_insecure_code(tmp_path, code):
    """The S rules that replaced the old regex checks are on: each planted fault is reported under the
    project's own ruff configuration, as if it were a module of the package."""
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (pip install -e '.[test]')")
    module = tmp_path / "harness" / "planted.py"
    module.parent.mkdir()
    module.write_text(PLANTED_INSECURE[code])
    done = subprocess.run([str(ruff), "check", "--config", str(REPO / "pyproject.toml"), "--no-cache",
                           "--output-format", "concise", str(module)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f" {code} " in done.stdout, done.stdout + done.stderr


def test_weights_are_written_as_safetensors():
    for f, text in _sources():
        for args in _calls(text, "save_pretrained"):
            assert "safe_serialization=False" not in args, f
        # torch.save writes only the optimizer state (read back with weights_only=True)
        for args in _calls(text, "torch.save"):
            assert "optimizer" in args, f"{f.relative_to(REPO)}: torch.save({args})"
