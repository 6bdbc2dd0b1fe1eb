"""Spread the GPU suite's (preset, seed) cases over a runner's GPUs with pytest-xdist.

``pytest suites/gpu --run-gpu -n 4 --dist loadgroup`` starts xdist workers ``gw0`` .. ``gw3``; the GPU conftest
pins worker ``gwI`` to GPU ``I mod n`` of the runner's GPUs by setting ``CUDA_VISIBLE_DEVICES`` before torch
touches CUDA, and puts every test of one (preset, seed) in one xdist group, so that each case trains once,
on its own GPU. Plain Python, no torch: ``suites/unit/test_gpu_pinning.py`` checks it on the CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess

WORKER_RE = re.compile(r"^gw(\d+)$")


def runner_gpus(visible: str | None, nvidia_smi: str | None = None) -> list[str]:
    """The GPUs this runner may use: ``CUDA_VISIBLE_DEVICES`` when set (ids or UUIDs, in its order), else the
    indices ``nvidia-smi`` lists (asked without initialising CUDA in this process); [] when there is none."""
    if visible is not None:
        return [x.strip() for x in visible.split(",") if x.strip()]
    if nvidia_smi is None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return []
        try:
            nvidia_smi = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                        text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    return [line.strip() for line in nvidia_smi.splitlines() if line.strip()]


def gpu_for_worker(worker_id: str | None, gpus: list[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value for xdist worker ``worker_id`` (``gw0``, ``gw1``, ...): worker I gets
    ``gpus[I mod len(gpus)]``. None (leave the environment alone) outside xdist (no worker id, or ``master``)
    or without GPUs."""
    m = WORKER_RE.match(worker_id or "")
    if m is None or not gpus:
        return None
    return gpus[int(m.group(1)) % len(gpus)]


def case_group(preset: str, seed: int) -> str:
    """The xdist group of a (preset, seed): its tests share one worker, hence one training run and one GPU."""
    return f"{preset}-s{seed}"
