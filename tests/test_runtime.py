"""The one device / precision rule of inference and training (`tpas.runtime`), and the process group's life cycle."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from tpas.errors import TpasInputError
from tpas.runtime import distributed, precision_policy, resolve_device


def test_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TpasInputError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(TpasInputError, match=r"train\.device 'tpu'"):
        resolve_device("tpu", option="train.device")
    if torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device("cuda") == torch.device("cuda:0")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(TpasInputError, match="no CUDA device"):
            resolve_device("cuda")


def test_half_precision_is_cuda_only_and_fp32_runs_anywhere() -> None:
    cpu = torch.device("cpu")
    fp32 = precision_policy(cpu, "fp32")
    assert isinstance(fp32.autocast(), contextlib.nullcontext) and not fp32.grad_scaler().is_enabled()
    for half in ("fp16", "bf16"):
        with pytest.raises(TpasInputError, match=f"--precision {half} needs a CUDA device"):
            precision_policy(cpu, half)
        with pytest.raises(TpasInputError, match=r"train\.precision"):
            precision_policy(cpu, half, option="train.precision")
    with pytest.raises(TpasInputError, match="expected one of fp32, fp16, bf16"):
        precision_policy(cpu, "fp8")
    cuda = precision_policy(torch.device("cuda", 0), "fp16")  # checking the rule needs no GPU
    assert cuda.dtype == torch.float16 and cuda.name == "fp16"
    assert precision_policy(torch.device("cuda", 0), "bf16").dtype == torch.bfloat16


def test_single_process_creates_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed(torch.device("cpu")) as d:
        assert (d.rank, d.world, d.active) == (0, 1, False)
        assert d.shard(5) == range(5) and d.all_gather("x") == ["x"] and d.broadcast(3) == 3
        d.barrier()
        assert not dist.is_initialized()
