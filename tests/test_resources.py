"""Memory checks: a dense matrix that cannot fit is refused before allocation; out-of-memory names the batch size."""

from __future__ import annotations

import pytest
import torch

from tpas import resources
from tpas.errors import TpasError, TpasResourceError


def test_a_dense_matrix_over_available_memory_is_refused_with_its_size_and_the_top_k_form(monkeypatch):
    monkeypatch.setenv(resources.MEMORY_ENV, "1G")
    # 100k x 1M float32 = 400 GB: refused, naming both sizes and the alternative.
    with pytest.raises(TpasResourceError) as err:
        resources.check_dense_fits(100_000, 1_000_000)
    msg = str(err.value)
    assert "100,000 queries x 1,000,000 gallery images" in msg and "372.5 GiB" in msg and "1.0 GiB" in msg
    assert "top-K" in msg and "\n" not in msg
    assert isinstance(err.value, TpasError)  # the CLI prints every TpasError as one line, exit 2


def test_what_fits_is_returned_and_copies_count(monkeypatch):
    monkeypatch.setenv(resources.MEMORY_ENV, "100M")
    assert resources.check_dense_fits(1000, 1000) == 4_000_000
    with pytest.raises(TpasResourceError, match=r"3 x 38\.1 MiB = 114\.4 MiB"):
        resources.check_dense_fits(1000, 10_000, copies=3)
    assert resources.check_dense_fits(1000, 10_000, copies=3, available=1 << 40) == 120_000_000


def test_available_memory_reads_meminfo_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv(resources.MEMORY_ENV, raising=False)
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    monkeypatch.setattr(resources, "_MEMINFO", fake)
    assert resources.available_memory() == 2048 * 1024
    monkeypatch.setattr(resources, "_MEMINFO", tmp_path / "absent")
    assert resources.available_memory() is None
    assert resources.check_dense_fits(10**6, 10**6) == 4 * 10**12  # unknown memory never refuses
    monkeypatch.setenv(resources.MEMORY_ENV, "lots")
    with pytest.raises(TpasResourceError, match="TPAS_MEMORY_AVAILABLE"):
        resources.available_memory()


@pytest.mark.parametrize(
    ("text", "expected"), [("123", 123), ("8G", 8 << 30), ("512m", 512 << 20), ("1.5GiB", 3 << 29)]
)
def test_sizes_parse(text, expected):
    assert resources.parse_bytes(text) == expected


def test_cuda_out_of_memory_becomes_one_line_naming_the_batch_size():
    e = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.2 GiB is "
        "free. Of the allocated memory ...\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC"
    )
    assert resources.is_out_of_memory(e)
    msg = resources.out_of_memory_message(e, batch_size=64, device="cuda:0")
    assert msg == (
        "out of memory on cuda:0 (CUDA out of memory. Tried to allocate 2.00 GiB): --batch-size 64 does not fit; "
        "lower it, e.g. --batch-size 32"
    )
    one = resources.out_of_memory_message(e, batch_size=1, option="--set train.batch_size")
    assert "--set train.batch_size=1 does not fit" in one and "\n" not in one
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4398046511104 bytes.")
    assert resources.is_out_of_memory(cpu) and not resources.is_out_of_memory(RuntimeError("shape mismatch"))
