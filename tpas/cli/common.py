"""What every stage's commands share: the consoles, path and choice checks, progress bars, and the error path.

The error path is the one place where an exception becomes what the user reads: every TpasError, a usage mistake, an
OSError or an out-of-memory error is one line on stderr (a usage mistake adds the usual "Try ... --help" hint) and
exit code 2. Anything else is a bug in tpas and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..errors import TpasError, TpasInputError

console = Console()
err_console = Console(stderr=True)

# Typer 0.2x vendors its own click; take the exception classes from wherever typer's BadParameter lives.
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)
ClickException = _click_exceptions.ClickException
UsageError = _click_exceptions.UsageError
NoSuchOption = _click_exceptions.NoSuchOption
_NoArgsIsHelp = getattr(_click_exceptions, "NoArgsIsHelpError", ())  # older click prints help without raising

TIES_HELP = "Tie rule: stable (equal scores keep gallery order, as the ranking file) | optimistic | pessimistic."
MATCH_HELP = "Relevant images: image (PAB protocol) | identity (same image_id)."
SET_HELP = "Override a config key, e.g. --set fuse.weights=[0.1,0.9,0.9] --set inputs.clip=other.pt (repeatable)."


def existing_file(path: Path) -> Path:
    """Resolve a CLI path argument that must be an existing file (TpasInputError otherwise)."""
    if not path.is_file():
        raise TpasInputError("file not found", path)
    return path


def policies(match: str, ties: str) -> tuple[str, str]:
    """`--match` and `--ties` checked against the scoring enums (one line naming the option otherwise)."""
    from ..ranking import Ties
    from ..scoring.relevance import Match

    return choice(match, tuple(m.value for m in Match), "--match"), choice(ties, tuple(t.value for t in Ties), "--ties")


def choice(value: str, choices: Sequence[str], option: str) -> str:
    """`value` when it is one of `choices`; TpasInputError naming `option` and the choices otherwise."""
    if value not in choices:
        raise TpasInputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


@contextmanager
def progress_bar(description: str, *columns: Any) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr; yields `update(done, total, description=None)` for library callbacks."""
    from rich.progress import Progress

    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None, description: str | None = None) -> None:
            shown = {} if description is None else {"description": description}
            bar.update(task, completed=done, total=total, **shown)

        yield update


def print_error(message: str) -> None:
    """One `error: ...` line on stderr."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _usage_line(e: UsageError) -> None:
    # click prints usage + hint + "Error: ..." (typer: a boxed panel); the user needs the message and where to look.
    print_error(e.format_message())
    if e.ctx is not None and e.ctx.command.get_help_option(e.ctx) is not None:
        err_console.print(f"Try '{e.ctx.command_path} {e.ctx.help_option_names[0]}' for help.", highlight=False)


_OOM_HINTS = {
    "infer": "lower --batch-size (images, captions or pairs per batch), or use --precision fp16/bf16 on a GPU",
    "train": "lower the training batch size (--set train.batch_size=N) or use a smaller model",
}


def _oom_message(e: BaseException, argv: Sequence[str]) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = _OOM_HINTS.get(argv[0] if argv else "", "free memory or use a machine with more")
    return f"out of memory ({first[:200]}): {hint}"


def run_app(app: typer.Typer, argv: Sequence[str] | None) -> int:
    """Run `app` on `argv` (default: sys.argv[1:]); returns the exit code, turning expected failures into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="tpas", standalone_mode=False)
    except _NoArgsIsHelp as e:
        e.show()
        return e.exit_code
    except UsageError as e:
        _usage_line(e)
        return 2
    except ClickException as e:
        print_error(e.format_message())
        return e.exit_code
    except typer.Abort:
        print_error("aborted")
        return 1
    except TpasError as e:
        print_error(str(e))
        return 2
    except OSError as e:
        if e.errno == errno.EPIPE:  # output piped into `head`: nothing to report
            return 1
        where = f"{e.filename}: " if e.filename else ""
        print_error(f"{where}{e.strerror or e}")
        return 2
    except (MemoryError, RuntimeError) as e:
        from ..resources import is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print_error(_oom_message(e, args))
        return 2
    return code if isinstance(code, int) else 0
