"""The one vocabulary for figures, in the HTML report and on the terminal: a figure that was not measured reads
"not measured" everywhere, numbers have the same significant digits, percentages and durations one format."""

from __future__ import annotations

import json
import math
from typing import Any

NOT_MEASURED = "not measured"

#: a reward difference smaller than this (in absolute value) is no change: float noise of two scorings of
#: (nearly) the same summary, never a gain or a loss
REWARD_NOISE = 1e-4
#: below this, :func:`fmt_num` writes scientific notation (four significant digits either way)
SCIENTIFIC_BELOW = 1e-4


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for a table cell: ``None`` -> "not measured", NaN -> "NaN", otherwise ``digits`` significant.

    Every float gets the same number of significant digits, trailing zeros included (``0.9580``, ``12.30``),
    so that a column reads consistently; integers stay integers, zero is ``0``, values from
    ``10**digits`` on are whole numbers with thousands separators, and only magnitudes below
    :data:`SCIENTIFIC_BELOW` use scientific notation (``1.230e-05``).
    """
    if v is None:
        return NOT_MEASURED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == 0:
            return "0"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        if abs(v) < SCIENTIFIC_BELOW:
            return f"{v:.{digits - 1}e}"
        text = f"{v:#.{digits}g}"
        if "e" in text:  # rounded up to 10**digits (9999.7)
            return f"{v:,.0f}"
        return text.rstrip(".")
    return str(v)


def fmt_signed(v: Any, digits: int = 4) -> str:
    text = fmt_num(v, digits)
    if is_number(v) and math.isfinite(v) and v > 0:
        return "+" + text
    return text


def fmt_diff(v: Any, digits: int = 4) -> str:
    """A reward difference: below :data:`REWARD_NOISE` in absolute value it is no change ("0"), never noise
    such as ``+2.384e-07``; otherwise signed, like :func:`fmt_signed`."""
    if is_number(v) and math.isfinite(v) and abs(v) < REWARD_NOISE:
        return "0"
    return fmt_signed(v, digits)


def fmt_pct(v: Any, digits: int = 1) -> str:
    if not is_number(v):
        return fmt_num(v)
    if not math.isfinite(v):
        return fmt_num(float(v))
    return f"{100 * v:.{digits}f}%"


def fmt_duration(v: Any) -> str:
    if not is_number(v) or not math.isfinite(v):
        return fmt_num(v)
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(int(round(v)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(v: Any) -> str:
    """A config value: strings as they are, everything else as JSON."""
    if isinstance(v, str):
        return v
    if v is None:
        return "null"
    return json.dumps(v, ensure_ascii=False)
