"""A tiny T5 policy for the unit tests of the step, the rollout and the attention (the fixture that builds its
directory, ``tiny_t5_dir``, is in ``conftest.py``): the loader with a fresh LoRA, and random token prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.config import PolicyConfig
from harness.models import PolicyWithValueHead, load_policy

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "model"  # 96 tokens (pad 0, eos 1)
BATCH = 8  # rows per PPO batch in these tests: two mini-batches of PPOConfig's default 4


def make_policy(model_dir: Path, seed: int = 0, **overrides) -> PolicyWithValueHead:
    """The harness's loader with a fresh LoRA (its A initialised from ``seed``)."""
    torch.manual_seed(seed)
    fields = dict(model=str(model_dir), dtype="float32", lora_r=4, lora_alpha=8, lora_target_modules=["q", "v"])
    fields.update(overrides)
    return load_policy(PolicyConfig(**fields), device="cpu")


def random_prompts(n: int, seed: int, vocab: int = 96, min_len: int = 3, max_len: int = 20) -> list[list[int]]:
    """Token-id prompts (no pad, no EOS inside) ending in EOS, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len, (n,), generator=g)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() + [1] for k in lengths]
