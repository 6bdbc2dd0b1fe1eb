"""Per-row seeded sampling on the device, for the whole batch in one pass.

Each row's noise is a pure function of ``(row seed, position, token id)``: a counter-based generator made of
integer tensor ops (a 32-bit multiply-xorshift mixer), so no per-row generator lives on the host and
nothing is copied to the device per token. The noise becomes a uniform in (0, 1), then Gumbel noise:
``argmax(logits + gumbel)`` is an exact sample of ``softmax(logits)`` (the Gumbel-max trick), and a row's
draw depends only on its seed, its position and its logits: not on the batch, nor on its place in it.

Integer arithmetic is done in int64 on values below 2**32 with multipliers below 2**31, so no product
ever overflows: the result is the same on every device and backend. :func:`mix32_int` is the same mixer
on Python integers, the specification the tensor code is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
MULT = 0x045D9F3B  # the multiplier of the mixer (< 2**31: products of 32-bit values stay below 2**63)
POSITION_SALT = 0x3C6EF372
TOKEN_SALT = 0x2545F491


def mix32_int(x: int) -> int:
    """The 32-bit mixer on a Python integer (the reference for :func:`mix32`)."""
    x &= MASK32
    x = (((x >> 16) ^ x) * MULT) & MASK32
    x = (((x >> 16) ^ x) * MULT) & MASK32
    return (x >> 16) ^ x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32_int` elementwise on an int64 tensor of values in [0, 2**32); in place where possible."""
    x = x.bitwise_xor(x >> 16)
    x.mul_(MULT).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    x.mul_(MULT).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 16)


def row_key_int(seed: int) -> int:
    """A 32-bit key for a (up to 64-bit) seed: both halves go through the mixer."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return mix32_int((seed & MASK32) ^ mix32_int((seed >> 32) ^ 0x9E3779B9))


def noise_bits_int(seed: int, position: int, token: int) -> int:
    """The 32 random bits for (seed, position, token): the specification :class:`CounterNoise` follows."""
    step_key = mix32_int(row_key_int(seed) ^ mix32_int((position + POSITION_SALT) & MASK32))
    return mix32_int(step_key ^ mix32_int((token + TOKEN_SALT) & MASK32))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit values -> float32 uniforms strictly inside (0, 1): the top 23 bits, centred in their bin.

    23, not 24: ``2**24 - 1 + 0.5`` is not a float32 (it rounds to ``2**24``, a uniform of 1.0 and an infinite
    Gumbel); every ``k + 0.5`` with ``k < 2**23`` is, and so is the result."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


class CounterNoise:
    """Gumbel noise for a batch of rows, each with its own seed; ``noise(position)`` is (B, V).

    The row keys and the token hashes are computed once (on ``device``); each position costs one mix over
    (B, V) int64 values.
    """

    def __init__(self, seeds: Sequence[int], vocab_size: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vocab_size = int(vocab_size)
        self.row_keys = torch.tensor([row_key_int(s) for s in seeds], dtype=torch.long, device=self.device)
        tokens = torch.arange(self.vocab_size, dtype=torch.long, device=self.device)
        self.token_hash = mix32((tokens + TOKEN_SALT).bitwise_and_(MASK32))

    def bits(self, position: int | torch.Tensor) -> torch.Tensor:
        """(B, V) int64: the 32 random bits of every row and token at ``position`` (an int or a (B,) tensor)."""
        pos = torch.as_tensor(position, dtype=torch.long, device=self.device)
        step_keys = mix32(self.row_keys.bitwise_xor(mix32((pos + POSITION_SALT).bitwise_and(MASK32))))
        return mix32(step_keys[:, None].bitwise_xor(self.token_hash[None, :]))

    def gumbel(self, position: int | torch.Tensor) -> torch.Tensor:
        return gumbel_from_uniform(uniform_from_bits(self.bits(position)))


class RowSampler:
    """Samples one token per row from (B, V) logits at a decoding position, with each row's own seed.

    ``sample(logits, position)`` = ``argmax(logits / temperature + gumbel(seed, position, token))``; the
    EOS ban of ``min_new_tokens`` is the caller's (it acts on the logits before).
    """

    def __init__(self, seeds: Sequence[int], vocab_size: int, device, temperature: float = 1.0):
        self.noise = CounterNoise(seeds, vocab_size, device)
        self.temperature = temperature

    def perturb(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """The tempered logits plus the rows' Gumbel noise at ``position`` (argmax of it is the sample)."""
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits + self.noise.gumbel(position)

    def sample(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        return self.perturb(logits, position).argmax(-1)
