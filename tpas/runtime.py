"""Where and how a run computes: device choice, the precision/autocast rule, and torch.distributed set-up/tear-down.

Inference (`tpas.models.engine`) and training (`tpas.train.trainer`) both go through this module, so the same
`--device` / `--precision` values mean the same thing in both:

- device: `auto` is this process's CUDA device when CUDA is available, else the CPU; `cuda` is `cuda:LOCAL_RANK`
  (one GPU per process under torchrun); `cuda:N` is kept as given; `cpu` is the CPU.
- precision: `fp32` computes in float32 everywhere; `fp16` / `bf16` run the forward passes under `torch.autocast`
  **on CUDA only**. On a CPU they are refused (TpasInputError): CPU autocast is slower than fp32 on most CPUs and
  its fp16 kernels are incomplete, so a half-precision request there is almost always a configuration mistake.
- processes: under torchrun (WORLD_SIZE > 1) a run joins the process group that exists, or creates one (nccl for
  CUDA, gloo for CPU) and destroys it when the run ends, so a program may call `infer()` or `train()` several times.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """`torch.autocast` for fp16/bf16 (CUDA), a no-op context for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The trainer's loss scaler: active for fp16 only (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def precision_policy(device: torch.device, precision: str, option: str = "--precision") -> Precision:
    """Check `precision` against the one rule (fp32 anywhere; fp16/bf16 autocast on CUDA only)."""
    if precision not in PRECISIONS:
        raise TpasInputError(f"{option} {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise TpasInputError(
            f"{option} {precision} needs a CUDA device; on {device.type} tpas computes in fp32 (set {option} fp32)"
        )
    return Precision(precision, device)


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
