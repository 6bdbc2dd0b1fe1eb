"""``evaluate`` modules kept in the project, loaded offline with ``evaluate.load(<local path>)``.

They are plain scripts that ``evaluate`` copies into its module cache and imports; this package only
tells where they are (see :func:`harness.evaluation.toxicity_measurement_path`).
"""

from __future__ import annotations

from pathlib import Path

MEASUREMENTS_DIR = Path(__file__).resolve().parent


def measurement_path(name: str) -> str:
    """The directory of the measurement ``name`` (it holds ``<name>.py``), for ``evaluate.load``."""
    path = MEASUREMENTS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"no evaluate measurement named {name!r} in {MEASUREMENTS_DIR}")
    return str(path)
