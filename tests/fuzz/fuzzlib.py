"""What every fuzz test shares: seeded hypothesis settings, the one property, and strategies for broken files.

The property of every reader a user can point at a file: it returns a valid result or raises TpasInputError whose
message names the file. Any other exception (IndexError, KeyError, UnicodeDecodeError, ...) is a crash: it reaches
the user as a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tpas.errors import TpasInputError


def fuzz_settings(examples: int) -> settings:
    """Seeded (derandomised), no example database, no deadline: the same inputs on every run and machine.

    `TPAS_FUZZ_SCALE=20` multiplies the examples for a longer hunt than `make test` affords.
    """
    return settings(
        max_examples=examples * int(os.environ.get("TPAS_FUZZ_SCALE", "1")),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def valid_or_refused(read: Callable[[Path], Any], path: Path) -> Any:
    """`read(path)`; a TpasInputError must name `path` (returned as None); any other exception propagates."""
    try:
        return read(path)
    except TpasInputError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        assert "\n" not in str(e).strip(), f"error is more than one line: {e!r}"
        return None


# JSON values of any shape, kept small.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def json_objects_with(keys: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Objects that carry some of the expected keys, each with a plausible or arbitrary value."""
    return st.fixed_dictionaries({}, optional={k: v | json_values for k, v in keys.items()}) | json_values


def mutate(seed: bytes) -> st.SearchStrategy[bytes]:
    """Variants of a valid file: flipped bytes, a truncation, an inserted or deleted run, or the file itself."""

    @st.composite
    def _mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            if op == "flip":
                data[at] = draw(st.integers(0, 255))
            elif op == "truncate":
                del data[at:]
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            else:
                del data[at : at + draw(st.integers(1, 64))]
        return bytes(data)

    return _mutated()


def text_variants(seed: str) -> st.SearchStrategy[bytes]:
    """A valid text file mutated at the byte level, or at the character level, or random text/bytes."""
    chars = st.text(alphabet=st.characters(codec="utf-8"), max_size=64).map(lambda s: s.encode("utf-8"))
    return mutate(seed.encode("utf-8")) | chars | st.binary(max_size=64)


def dumps(value: Any) -> bytes:
    """JSON bytes of a value (what a user's editor would have written)."""
    return json.dumps(value).encode("utf-8")
