"""Memory: refuse a dense [Q, G] matrix that cannot fit before allocating it, and say what to lower on out-of-memory.

A dense score matrix grows as queries x gallery (PAB-sized runs are small, but a city-scale gallery is not): allocating
one that does not fit ends in the kernel's OOM killer or a swap storm, long after the user could have chosen the top-K
form. `check_dense_fits` compares the matrix's size with what the kernel says is available (`MemAvailable` in
/proc/meminfo; `TPAS_MEMORY_AVAILABLE` overrides it, for tests and for containers whose limit /proc does not show).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import TpasResourceError

MEMORY_ENV = "TPAS_MEMORY_AVAILABLE"
_MEMINFO = Path("/proc/meminfo")
# Leave room for everything else the process holds (models, inputs, the copy a fusion makes).
_USABLE_FRACTION = 0.8
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def format_bytes(n: float) -> str:
    """`1.5 GiB`-style size for messages."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def parse_bytes(text: str) -> int:
    """`8G`, `512M`, `1.5g`, `123456` -> bytes; ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if m is None:
        raise ValueError(f"not a size: {text!r} (expected bytes, or a number with K/M/G/T)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping: $TPAS_MEMORY_AVAILABLE, else MemAvailable; None when unknown."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return parse_bytes(override)
        except ValueError as e:
            raise TpasResourceError(f"${MEMORY_ENV}: {e}") from None
    try:
        text = _MEMINFO.read_text()
    except OSError:  # not Linux: no estimate, no refusal
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def dense_bytes(rows: int, cols: int, element_size: int = 4, copies: int = 1) -> int:
    """Bytes of `copies` dense [rows, cols] matrices of `element_size`-byte elements (float32: 4)."""
    return rows * cols * element_size * copies


def check_dense_fits(
    rows: int,
    cols: int,
    *,
    what: str = "score matrix",
    element_size: int = 4,
    copies: int = 1,
    available: int | None = None,
    alternative: str = "keep each query's top-K cells instead (the top-K SimsMatrix form)",
) -> int:
    """The bytes of a dense [rows, cols] matrix; TpasResourceError naming the size and `alternative` when it exceeds
    80% of `available` (default: `available_memory()`). An unknown amount of memory never refuses."""
    need = dense_bytes(rows, cols, element_size, copies)
    have = available_memory() if available is None else available
    if have is not None and need > _USABLE_FRACTION * have:
        many = f"{copies} x " if copies > 1 else ""
        raise TpasResourceError(
            f"a dense {what} of {rows:,} queries x {cols:,} gallery images needs {many}"
            f"{format_bytes(need / copies)} = {format_bytes(need)}, but only {format_bytes(have)} of memory is "
            f"available; {alternative}"
        )
    return need


def is_out_of_memory(e: BaseException) -> bool:
    """True for a CUDA or CPU allocation failure (torch.OutOfMemoryError, MemoryError, torch's allocator errors)."""
    torch = sys.modules.get("torch")  # an OOM can only come from torch once it is imported: never import it here
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "CUDA out of memory" in text


def out_of_memory_message(
    e: BaseException, *, batch_size: int | None = None, option: str = "--batch-size", device: str | None = None
) -> str:
    """One line for an out-of-memory failure: where it ran out, and the batch size to lower (halved as a start).

    `option` is how the user sets the batch size (`--batch-size`, or `--set train.batch_size` for training).
    """
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    # torch's CUDA message: "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..." -- keep the first two.
    first = ". ".join(first.split(". ")[:2]).rstrip(".")[:160]
    where = f" on {device}" if device else ""
    sep = "=" if option.startswith("--set ") else " "
    if batch_size is not None and batch_size > 1:
        fix = f"{option}{sep}{batch_size} does not fit; lower it, e.g. {option}{sep}{max(1, batch_size // 2)}"
    elif batch_size is not None:
        fix = f"{option}{sep}1 does not fit: use a device with more memory, or --precision fp16/bf16 on a GPU"
    else:
        fix = "free memory, or use a machine with more"
    return f"out of memory{where} ({first}): {fix}"


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, device: object = None, option: str = "--batch-size") -> Iterator[None]:
    """Inside: an out-of-memory failure becomes TpasResourceError naming the batch size to lower (one line)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        where = None if device is None else str(device)
        raise TpasResourceError(out_of_memory_message(e, batch_size=batch_size, option=option, device=where)) from None
