"""Row-parallel execution for block loops over query rows (the ensemble's, ranking in `evaluate`).

Each worker thread owns a contiguous range of query rows and runs torch ops with ONE intra-op thread (torch releases
the GIL inside ops, so the workers really run in parallel). Many small ops on cache-sized blocks are then free of
the per-op thread synchronisation that makes them crawl (up to 10x slower measured) when the cores are shared.
Results do not depend on the number of workers: every row is computed by the same ops either way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
_lock = threading.Lock()
_depth = 0
_saved = 1


def n_workers() -> int:
    """Worker threads: `TPAS_THREADS` when set, else torch's intra-op thread count (outside a parallel region)."""
    env = os.environ.get("TPAS_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return _saved if _depth else max(1, torch.get_num_threads())


@contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Run torch ops with one intra-op thread inside this block (re-entrant); the previous count is restored."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved)


def map_row_ranges(fn: Callable[[int, int], T], n_rows: int, workers: int | None = None) -> list[T]:
    """Call fn(lo, hi) on contiguous row ranges covering [0, n_rows), one per worker; results in row order."""
    w = max(1, min(workers or n_workers(), n_rows or 1))
    bounds = [n_rows * k // w for k in range(w + 1)]
    with single_threaded_ops():
        if w == 1:
            return [fn(0, n_rows)]
        with ThreadPoolExecutor(w, thread_name_prefix="tpas-rows") as ex:
            return list(ex.map(lambda k: fn(bounds[k], bounds[k + 1]), range(w)))
