"""Typed errors. The CLI turns every TpasError into one line on stderr and exit code 2."""

from __future__ import annotations

from pathlib import Path


class TpasError(Exception):
    """Base class of every error tpas raises on purpose."""


class TpasInputError(TpasError, ValueError):
    """Bad user input: a file, line, record or id that is not what was expected.

    Args:
        message: what was expected and what was found.
        path: the file at fault, when there is one.
        where: a location inside it ("line 17", "record 3", "query 'ABC'").
    """

    def __init__(self, message: str, path: str | Path | None = None, where: str | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = ""
        if self.path is not None:
            prefix = f"{self.path}"
            if self.where:
                prefix += f", {self.where}"
            prefix += ": "
        elif self.where:
            prefix = f"{self.where}: "
        return prefix + self.message


class TpasRunError(TpasError):
    """A step of a larger run failed (a `tpas demo` step): the message names the failed command and its log.

    Args:
        message: which command failed and how.
        log: the file holding that command's output, when there is one.
    """

    def __init__(self, message: str, log: str | Path | None = None):
        self.message = message
        self.log = None if log is None else Path(log)
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.message if self.log is None else f"{self.message} (log: {self.log})"


class TpasResourceError(TpasError):
    """The machine cannot do what was asked as asked (a matrix too large for its memory): the message says the size
    and what to change."""


def training_diverged(step: int, losses: dict[str, float], last_checkpoint: str | Path | None) -> TpasRunError:
    """The error that stops a training run whose loss became non-finite: the step, the bad losses, where to resume."""
    bad = ", ".join(f"{k}={v}" for k, v in losses.items() if v != v or v in (float("inf"), float("-inf")))
    if last_checkpoint is None:
        resume = "no checkpoint was written yet; lower the learning rate (--set optim.lr=...) and start again"
    else:
        resume = (
            f"the last good checkpoint is {last_checkpoint}; lower the learning rate (--set optim.lr=...) and "
            "continue from it with --resume"
        )
    return TpasRunError(f"training diverged at step {step}: non-finite loss ({bad or 'unknown'}); {resume}")
