"""Exit codes and one-line errors of the ``markov-rsa`` command.

0: done. 1: the run failed (backend unreachable, TLS, every rollout failed). 2: usage error (a bad
flag, setting or file). 130: interrupted. With ``--json`` a failure also prints
``{"error": {"message", "type", "param", "code"}}`` on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence

import typer
from typer.exceptions import TyperException
from rich.console import Console

from markov_rsa import ConfigError, MarkovRSAError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def error_type(code: int) -> str:
    """The ``type`` of the ``--json`` error object for an exit code."""
    return {EXIT_USAGE: "usage_error", EXIT_INTERRUPTED: "interrupted"}.get(code, "run_failed")


def report(message: str, code: int, *, as_json: bool = False, param: str | None = None) -> None:
    """One line on stderr; with ``as_json`` also the error object on stdout."""
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True, markup=True)
    if as_json:
        error = {"message": message, "type": error_type(code), "param": param, "code": code}
        sys.stdout.write(json.dumps({"error": error}, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def fail(message: str, code: int = EXIT_USAGE, *, as_json: bool = False, param: str | None = None) -> typer.Exit:
    """Report an error; return the exit to raise."""
    report(message, code, as_json=as_json, param=param)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; never a traceback."""
    try:
        yield
    except ConfigError as err:
        raise fail(str(err), EXIT_USAGE, as_json=as_json, param=err.param) from None
    except MarkovRSAError as err:
        raise fail(str(err), EXIT_FAILED, as_json=as_json) from None
    except OSError as err:
        # A file or directory the user named cannot be used (exists as a file, no permission...).
        where = f" {err.filename}" if err.filename else ""
        raise fail(f"cannot use{where}: {err.strerror or err}", EXIT_USAGE, as_json=as_json) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED, as_json=as_json) from None


def run_command(command: typer.Typer, args: Sequence[str], prog_name: str) -> int:
    """Run a Typer app and return its exit code, reporting usage errors in the same shapes as
    run errors (one line, and the error object under ``--json``)."""
    as_json = "--json" in args
    try:
        outcome = typer.main.get_command(command).main(
            list(args) or ["--help"], prog_name=prog_name, standalone_mode=False
        )
    except typer.Exit as done:
        outcome = done.exit_code
    except (typer.Abort, KeyboardInterrupt):
        report("interrupted", EXIT_INTERRUPTED, as_json=as_json)
        return EXIT_INTERRUPTED
    except TyperException as err:
        # Click's usage errors (exit code 2): unknown flag, bad value, missing argument.
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None and err.exit_code == EXIT_USAGE else ""
        report(f"{err.format_message()}{hint}", err.exit_code, as_json=as_json, param=_param_of(err))
        return err.exit_code
    if not args:
        return EXIT_USAGE  # no arguments at all: the help was shown, as for a usage error
    return outcome if isinstance(outcome, int) else EXIT_OK


def _param_of(err: TyperException) -> str | None:
    param = getattr(err, "param", None)
    name = getattr(param, "name", None)
    return str(name).split("__")[0] if name else None
