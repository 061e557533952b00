"""Where and how a run computes: device choice, the precision/autocast rule, and torch.distributed set-up/tear-down.

Inference (`tpas.models.engine`) and training (`tpas.train.trainer`) both go through this module, so the same
`--device` / `--precision` values mean the same thing in both:

- device: `auto` is this process's CUDA device when CUDA is available, else the CPU; `cuda` is `cuda:LOCAL_RANK`
  (one GPU per process under torchrun); `cuda:N` is kept as given; `cpu` is the CPU.
- precision: `fp32` computes in float32 everywhere; `fp16` / `bf16` run the forward passes under `torch.autocast`
  on CUDA. On a CPU, inference (`cpu_bf16=True`) may run `bf16` when the CPU multiplies bf16 natively (AVX512-BF16
  or AMX): the model's weights are cast to bf16 for the run (`Precision.cast_weights`, restored afterwards) and
  autocast casts the float inputs. CPU autocast over fp32 weights is erratic (a ViT-B/16 on an AVX512-BF16 EPYC:
  0.35x to 4x the fp32 time depending on the batch size); with bf16 weights it is 3-4x faster at every size. Everything
  else half-precision on a CPU is refused (TpasInputError): fp16 CPU kernels are incomplete, and training would
  need autocast (its master weights stay fp32), the slow path.
- processes: under torchrun (WORLD_SIZE > 1) a run joins the process group that exists, or creates one (nccl for
  CUDA, gloo for CPU) and destroys it when the run ends, so a program may call `infer()` or `train()` several times.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import TpasInputError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
"""A factory of the forward passes' precision context (`Precision.autocast`); `contextlib.nullcontext` for fp32."""
# Long enough for rank 0 to evaluate a full PAB test split while the other ranks wait at a collective.
_GROUP_TIMEOUT = timedelta(minutes=30)
# Groups this process created, numbered: every rank creates them in the same order, so the n-th has one name.
_created_groups = itertools.count()


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str, local: int | None = None, option: str = "--device") -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; `cuda` -> cuda:LOCAL_RANK; others are checked.

    `local` overrides LOCAL_RANK; `option` names the setting in error messages (`train.device` for the trainer).
    """
    local = local_rank() if local is None else local
    if device == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TpasInputError(f"{option} {device!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TpasInputError(f"{option} {device}: no CUDA device is available (use cpu or auto)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local}")
    return dev


@dataclass(frozen=True)
class Precision:
    """A validated precision on a device: `autocast()` gives a fresh context for one forward region."""

    name: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute dtype (float32 for fp32)."""
        return PRECISIONS[self.name]

    @property
    def casts_weights(self) -> bool:
        """True for bf16 on a CPU: the weights themselves are bf16 for the run (`cast_weights`)."""
        return self.name == "bf16" and self.device.type == "cpu"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """`torch.autocast` for fp16/bf16, a no-op context for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def cast_weights(self, model: torch.nn.Module, modules: Sequence[str] = ("",)) -> Iterator[None]:
        """Cast the floating parameters and buffers of `model`'s submodules named in `modules` ("" is the whole
        model) to this dtype for the duration, when `casts_weights`; a no-op otherwise.

        The original tensors are kept and put back on exit, so the caller's model is unchanged afterwards (a bf16
        round trip would lose fp32 bits); the run holds both copies meanwhile (1.5x the fp32 weights).
        """
        if not self.casts_weights:
            yield
            return
        tensors: dict[int, torch.Tensor] = {}
        for name in modules:
            sub = model.get_submodule(name)
            for t in itertools.chain(sub.parameters(), sub.buffers()):
                if t.is_floating_point():
                    tensors.setdefault(id(t), t)
        originals = [(t, t.data) for t in tensors.values()]
        try:
            for t, data in originals:
                t.data = data.to(self.dtype)
            yield
        finally:
            for t, data in originals:
                t.data = data

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The trainer's loss scaler: active for fp16 only (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), where bf16 weights pay off."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume not
        return False


def precision_policy(
    device: torch.device, precision: str, option: str = "--precision", *, cpu_bf16: bool = False
) -> Precision:
    """Check `precision` against the one rule: fp32 anywhere, fp16/bf16 autocast on CUDA, and with `cpu_bf16`
    (inference) bf16 weights on a CPU with native bf16."""
    if precision not in PRECISIONS:
        raise TpasInputError(f"{option} {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type == "cuda":
        return Precision(precision, device)
    if precision == "bf16" and cpu_bf16 and device.type == "cpu":
        if cpu_has_bf16():
            return Precision(precision, device)
        raise TpasInputError(
            f"{option} bf16 on a CPU needs native bf16 (AVX512-BF16 or AMX), which this CPU lacks (set {option} fp32)"
        )
    also = " (or, for bf16, a CPU with native bf16)" if cpu_bf16 else ""
    raise TpasInputError(
        f"{option} {precision} needs a CUDA device{also}; on {device.type} tpas computes in fp32 (set {option} fp32)"
    )


# ----------------------------------------------------------------------------------------------- process groups
def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0)."""
    return rank() == 0


class Distributed:
    """This run's view of the process group: rank, world size, shards and object collectives.

    Python objects travel over a gloo group even when the main backend is nccl (they are CPU pickles); tensors with
    gradients use the default group (`tpas.train.distributed`). A single process (no group) gets no-op collectives.
    """

    def __init__(self, object_group: Any = None) -> None:
        self.rank, self.world, self.local_rank = rank(), world_size(), local_rank()
        self._group = object_group

    @property
    def active(self) -> bool:
        """True with more than one process."""
        return self.world > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (ranks in order cover 0..n-1 exactly once)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier(group=self._group)


def _init_group(backend: str) -> None:
    """Create the default group from torchrun's environment, under a store prefix of its own.

    torch names a new default group like the one destroyed before it, so a second group in the same process would
    find the first one's addresses under its keys in torchrun's store and (depending on who writes first) connect to
    a closed port. A fresh prefix per created group keeps each group's keys apart.
    """
    store, rank_, world = next(dist.rendezvous("env://", timeout=_GROUP_TIMEOUT))
    store = dist.PrefixStore(f"tpas-run-{next(_created_groups)}", store)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=_GROUP_TIMEOUT)


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Distributed]:
    """The process group of one run: joined if it exists, else created under torchrun and destroyed on exit.

    Without a launcher (WORLD_SIZE unset or 1) this is a single process. On CUDA the process's current device is
    set to `device` first (nccl needs it). The backend of a created group is nccl for CUDA and gloo for the CPU.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if launched_by_torchrun() and not dist.is_initialized():
        _init_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    objects = None
    try:
        if is_distributed() and dist.get_backend() != "gloo":
            objects = dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT)
        yield Distributed(objects)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()  # also destroys `objects`
        elif objects is not None:
            dist.destroy_process_group(objects)  # the caller's group stays; our side group goes
