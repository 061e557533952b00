"""The CLI's one error path: every expected failure is one line on stderr and exit code 2; a bug keeps its traceback.

Failures are simulated by replacing the library function a command calls.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import tpas.models.engine
import tpas.submit
import tpas.train.trainer
from tpas.cli.demo import run_step
from tpas.demo import Step, run_parallel
from tpas.errors import TpasError, TpasInputError, TpasRunError

REPO = Path(__file__).resolve().parents[2]


def _one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith("error: ")
    return lines[0]


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TpasError("the bank is closed"), "error: the bank is closed"),
        (TpasRunError("step `tpas x` failed", "logs/0-x.log"), "error: step `tpas x` failed (log: logs/0-x.log)"),
        (TpasInputError("9 ids on line 17, expected 10", "a.txt"), "error: a.txt: 9 ids on line 17, expected 10"),
        (OSError(errno.ENOSPC, "No space left on device", "out/answer.txt"),
         "error: out/answer.txt: No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/answer.txt"),
         "error: /ro/answer.txt: Permission denied"),
    ],
)  # fmt: skip
def test_errors_and_os_errors_are_one_line(cli, monkeypatch, exc, expected):
    monkeypatch.setattr(tpas.submit, "validate_answer", _raise(exc))
    code, _, err = cli("validate", "answer.txt", "--query-index", "query_index.txt")
    assert _one_line(code, err) == expected


def test_a_bug_keeps_its_traceback(cli, monkeypatch):
    monkeypatch.setattr(tpas.submit, "validate_answer", _raise(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        cli("validate", "answer.txt", "--query-index", "query_index.txt")
    monkeypatch.setattr(tpas.submit, "validate_answer", _raise(RuntimeError("not memory")))
    with pytest.raises(RuntimeError, match="not memory"):
        cli("validate", "answer.txt", "--query-index", "query_index.txt")


# The CPU case is what torch 2.14 raises when its allocator fails, e.g. for `torch.empty(2**45, dtype=torch.uint8)`.
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                 CPU_OOM, MemoryError()])  # fmt: skip
def test_out_of_memory_during_inference_names_the_batch_size(cli, monkeypatch, gallery, toy_family, tmp_path, exc):
    monkeypatch.setattr(tpas.models.engine, "infer", _raise(exc))
    code, _, err = cli("infer", "toy", "--images", gallery.images, "--queries", gallery.queries,
                       "--out", tmp_path / "o.pt", "--batch-size", "256")  # fmt: skip
    line = _one_line(code, err)
    assert line.startswith("error: out of memory") and "lower --batch-size" in line
    if not isinstance(exc, MemoryError):
        assert "allocate" in line  # what torch said it could not allocate


def test_out_of_memory_during_training_names_the_config_key(cli, monkeypatch):
    monkeypatch.setattr(tpas.train.trainer, "train", _raise(torch.OutOfMemoryError("CUDA out of memory.")))
    code, _, err = cli("train", "cmp", "--config", REPO / "configs" / "train" / "cmp_tiny.yaml")
    # The training bar stays on screen (it is not transient); below it, the error is one line.
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("error: out of memory") and "--set train.batch_size=N" in last


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["evaluate", "x.pt"], "Missing option '--gt'", "tpas evaluate --help"),
        (["submit", "x.pt", "--query-index", "q", "--out", "a", "--k", "ten"], "Invalid value for '--k'",
         "tpas submit --help"),
        (["ensemble", "--config", "c.yaml", "--out", "o.pt", "--sett", "a=1"], "No such option: --sett",
         "tpas ensemble --help"),
        (["train", "nosuch"], "No such command 'nosuch'", "tpas train --help"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_and_the_hint(cli, argv, message, hint):
    code, out, err = cli(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 2 and lines[0].startswith("error: ") and message in lines[0], err
    assert lines[1] == f"Try '{hint}' for help."
    assert "╭" not in err and "Usage:" not in err


def test_help_and_version_exit_0(cli):
    assert cli("--version")[0] == 0
    code, out, _ = cli("evaluate", "--help")
    assert code == 0 and "--gt" in out


def test_a_failed_demo_step_names_its_command(tmp_path):
    with pytest.raises(TpasRunError, match=r"demo step `tpas evaluate` failed: .*missing\.pt: file not found"):
        run_step(["evaluate", str(tmp_path / "missing.pt"), "--gt", str(tmp_path / "gt.json")])
    answer, index = tmp_path / "answer.txt", tmp_path / "query_index.txt"
    answer.write_text("a b c\n")
    index.write_text("q0\n")
    with pytest.raises(TpasRunError, match=r"demo step `tpas validate` exited with status 2"):
        run_step(["validate", str(answer), "--query-index", str(index)])


def test_a_failed_parallel_demo_step_names_its_command_and_log(tmp_path):
    step = Step(title="evaluate", argv=("evaluate", str(tmp_path / "missing.pt"), "--gt", str(tmp_path / "gt.json")))
    with pytest.raises(TpasRunError) as e:
        run_parallel([step], tmp_path / "logs", poll=0.05)
    assert "`tpas evaluate" in str(e.value) and "failed (exit 2)" in str(e.value) and "file not found" in str(e.value)
    assert e.value.log == tmp_path / "logs" / "0-evaluate.log" and e.value.log.is_file()
