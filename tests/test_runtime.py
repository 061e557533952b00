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


def test_inference_may_run_bf16_weights_on_a_cpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(TpasInputError, match="--precision fp16 needs a CUDA device"):
        precision_policy(cpu, "fp16", cpu_bf16=True)
    monkeypatch.setattr("tpas.runtime.cpu_has_bf16", lambda: False)
    with pytest.raises(TpasInputError, match="needs native bf16 \\(AVX512-BF16 or AMX\\)"):
        precision_policy(cpu, "bf16", cpu_bf16=True)
    monkeypatch.setattr("tpas.runtime.cpu_has_bf16", lambda: True)
    with pytest.raises(TpasInputError, match=r"train\.precision bf16 needs a CUDA device"):
        precision_policy(cpu, "bf16", option="train.precision")  # training keeps its rule
    bf16 = precision_policy(cpu, "bf16", cpu_bf16=True)
    assert bf16.casts_weights and not precision_policy(torch.device("cuda", 0), "bf16").casts_weights
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cast_weights_casts_the_named_submodules_and_restores_the_exact_tensors() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    model.register_buffer("steps", torch.tensor(3))  # not floating: never cast
    model[1].register_buffer("scale", torch.rand(4))
    model[0].bias.data += 1 / 3  # bits a bf16 round trip would lose
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cpu = torch.device("cpu")
    with precision_policy(cpu, "fp32").cast_weights(model):
        assert model[0].weight.dtype == torch.float32  # no-op but for CPU bf16
    import tpas.runtime as rt

    bf16 = rt.Precision("bf16", cpu)
    with bf16.cast_weights(model, ("0", "1")):
        assert model[0].weight.dtype == model[1].scale.dtype == torch.bfloat16
        assert model[2].weight.dtype == torch.float32 and model.steps.dtype == torch.int64
        x = torch.rand(2, 3)
        with bf16.autocast():
            assert model[1](model[0](x)).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="boom"), bf16.cast_weights(model):
        assert model[2].weight.dtype == torch.bfloat16
        raise RuntimeError("boom")  # restored on the way out of a failed run too
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
