"""The ``markov-rsa`` command."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from markov_rsa import (
    Backend,
    ConfigError,
    MarkovRSA,
    MarkovRSAError,
    OpenAIBackend,
    RSAParams,
    RSAResult,
    params_from_env,
    resolve_params,
)
from markov_rsa._runlog import LoggedRun, RunLog, read_run_log
from markov_rsa.fake_backend import FakeBackendConfig
from markov_rsa.upstream import DEFAULT_MAX_RESPONSE_BYTES
from markov_rsa.fake_backend import serve as serve_fake_backend

from ._options import model_options, with_signature
from ._progress import ProgressDisplay

app = typer.Typer(
    name="markov-rsa",
    help="Markovian RSA test-time compute: N parallel reasoning traces, bounded tails, recursive aggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RSA_PANEL = "Markovian RSA parameters"
BACKEND_PANEL = "Backend"


def _option(name: str, annotation: Any, default: Any, *decls: str, help: str, envvar: str | None = None) -> inspect.Parameter:
    option = typer.Option(default, *decls, help=help, envvar=envvar, rich_help_panel=BACKEND_PANEL)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


# Shared by every command that talks to a backend; each becomes a keyword of make_backend().
BACKEND_OPTIONS = [
    _option("backend", Optional[str], None, "--backend", envvar="MARKOV_RSA_BACKEND",
            help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1; unset runs the local engine."),
    _option("model", Optional[str], None, "--model", envvar="MARKOV_RSA_MODEL",
            help="Server: model name (default: its first). Local: a GGUF, a checkpoint dir or a cached id "
                 "(default: the embedded SmolLM2-135M-Instruct)."),
    _option("api_key", Optional[str], None, "--api-key", envvar="MARKOV_RSA_API_KEY", help="Bearer key for the backend."),
    _option("concurrency", int, 64, "--concurrency", help="Max requests in flight."),
    _option("requests_per_second", Optional[float], None, "--rps", help="Max requests started per second."),
    _option("timeout", float, 900.0, "--timeout",
            help="Total seconds a request may take, from sending it to the last byte, before it is retried."),
    _option("idle_timeout", Optional[float], None, "--idle-timeout",
            help="Seconds a server may stay silent inside a response body (default: the --timeout)."),
    _option("max_response_bytes", int, DEFAULT_MAX_RESPONSE_BYTES, "--max-response-bytes",
            help="Largest response body read from the server; larger ones fail the call."),
    _option("max_retries", int, 4, "--max-retries", help="Retries per rollout on 429, 5xx and timeouts."),
    _option("tokenizer", Optional[str], None, "--tokenizer",
            help="Local tokenizer.json or model dir, for servers without /tokenize."),
    _option("device", Optional[str], None, "--device", help="Local engine: cpu, cuda, cuda:1 (default: CUDA if present)."),
    _option("allow_download", bool, False, "--allow-download/--no-download",
            help="Local engine: let a model id missing from the local cache be downloaded."),
]
BACKEND_NAMES = tuple(p.name for p in BACKEND_OPTIONS)
PRESET_OPTION = inspect.Parameter(
    "preset",
    inspect.Parameter.KEYWORD_ONLY,
    default=typer.Option(None, "--preset", help="zaya1 | extra-high | rsa-paper | smoke | local.", rich_help_panel=RSA_PANEL),
    annotation=Optional[str],
)
RUN_OPTIONS = [PRESET_OPTION, *model_options(RSAParams, RSA_PANEL), *BACKEND_OPTIONS]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error on stderr; return the exit to raise."""
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Any:
    """Turn library errors into one line on stderr and a non-zero exit; never a traceback."""
    try:
        yield
    except ConfigError as err:
        raise fail(str(err), 2) from None
    except MarkovRSAError as err:
        raise fail(str(err), 1) from None
    except OSError as err:
        # A file or directory the user named cannot be used (exists as a file, no permission...).
        where = f" {err.filename}" if err.filename else ""
        raise fail(f"cannot use{where}: {err.strerror or err}", 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


def read_problem(problem: str | None) -> str:
    """The problem from the argument, or stdin for ``-`` or no argument on a pipe."""
    if problem is None or problem == "-":
        if problem is None and sys.stdin.isatty():
            raise ConfigError("no problem given: pass it as an argument, or '-' to read stdin")
        problem = sys.stdin.read()
    if not problem.strip():
        raise ConfigError("the problem is empty")
    return problem


def split_flags(flags: dict[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``(preset, RSA parameter flags, backend flags)`` from a command's keyword arguments.

    With no backend the run is on the local engine, whose default preset is ``local``.
    """
    backend = {name: flags.pop(name) for name in BACKEND_NAMES}
    preset = flags.pop("preset", None)
    if preset is None and backend["backend"] in (None, "local"):
        preset = "local"
    return preset, flags, backend


def build_params(preset: str | None, flags: dict[str, Any]) -> RSAParams:
    """Defaults < preset < MARKOV_RSA_* environment < command-line flags."""
    with_env = resolve_params(preset, params_from_env(os.environ))
    return resolve_params(None, flags, base=with_env)


def make_backend(
    backend: str | None,
    model: str | None,
    api_key: str | None,
    concurrency: int,
    requests_per_second: float | None,
    timeout: float,
    idle_timeout: float | None,
    max_response_bytes: int,
    max_retries: int,
    tokenizer: str | None,
    device: str | None,
    allow_download: bool,
) -> Backend:
    """The backend the flags name: an OpenAI-compatible server, or the in-process engine."""
    if backend is None or backend == "local":
        from markov_rsa.engine import LocalEngine

        return LocalEngine(model, device=device, allow_download=allow_download, max_batch_size=min(concurrency, 16))
    return OpenAIBackend(
        backend,
        model,
        api_key,
        concurrency=concurrency,
        requests_per_second=requests_per_second,
        timeout=timeout,
        idle_timeout=idle_timeout,
        max_response_bytes=max_response_bytes,
        max_retries=max_retries,
        tokenizer=tokenizer,
    )


async def check_backend(backend: Backend) -> None:
    """Fail fast, with one line, when the backend cannot be reached, refuses us, or cannot load."""
    try:
        if isinstance(backend, OpenAIBackend):
            await backend.resolve_model()
        else:
            await backend.load()  # type: ignore[attr-defined]
    except ConfigError:
        raise
    except MarkovRSAError as err:
        raise ConfigError(f"cannot use backend {backend.name}: {err}") from None


def fan_out(*handlers: Any) -> Any:
    """One event handler that feeds several consumers of the same stream."""
    active = [h for h in handlers if h is not None]

    def handle(event: Any) -> None:
        for handler in active:
            handler(event)

    return handle if active else None


def load_resume(run_dir: str) -> LoggedRun:
    """Read a run log to resume, telling the user about records that had to be skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = read_run_log(run_dir)
    for line in logged.skipped_lines:
        Console(stderr=True, soft_wrap=True).print(f"warning: {run_dir}/run.jsonl line {line} is unreadable; skipped it")
    return logged


async def run_solve(
    problem: Any,
    params: RSAParams,
    backend: Backend,
    show_progress: bool,
    run_dir: str | None = None,
    resume: LoggedRun | None = None,
) -> RSAResult:
    """Run one solve with a progress display, logging it when asked."""
    try:
        if show_progress and not isinstance(backend, OpenAIBackend):
            Console(stderr=True).print(f"[dim]loading {backend.name}...[/dim]")
        await check_backend(backend)
        log = RunLog(run_dir, resuming=resume is not None) if run_dir else None
        display = ProgressDisplay(Console(stderr=True)) if show_progress else None
        try:
            with display if display is not None else contextlib.nullcontext():
                return await MarkovRSA(backend, params).solve(
                    problem,
                    fan_out(display, log),
                    existing=resume.records if resume else None,
                    seed=resume.seed if resume else None,
                )
        finally:
            if log is not None:
                log.close()
    finally:
        await backend.aclose()


def solve(
    problem: Optional[str] = typer.Argument(None, help="The problem to solve; '-' (or nothing, on a pipe) reads stdin."),
    *,
    run_dir: Optional[str] = typer.Option(
        None, "--run-dir", help="Log the run as JSONL in this directory, every rollout as it finishes."
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue the run logged in this directory; only missing rollouts are generated."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the answer, usage and rounds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    **flags: Any,
) -> None:
    """Solve one problem with Markovian RSA and print the answer."""
    preset, rsa_flags, backend_flags = split_flags(flags)
    with user_errors():
        logged = load_resume(resume) if resume else None
        if logged is not None:
            params, problem_or_messages, run_dir = logged.params, logged.messages, resume
        else:
            params = build_params(preset, rsa_flags)
            problem_or_messages = read_problem(problem)
        backend = make_backend(**backend_flags)
        show = not quiet and not as_json and Console(stderr=True).is_terminal
        result = asyncio.run(run_solve(problem_or_messages, params, backend, show, run_dir, logged))
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write((result.answer if result.answer is not None else result.final_text.strip()) + "\n")


app.command("solve", help=solve.__doc__)(with_signature(solve, RUN_OPTIONS))


def evaluate(
    dataset: Path = typer.Argument(..., help="JSONL file: one {id, problem, answer, task?} object per line."),
    *,
    out: Optional[Path] = typer.Option(None, "--out", help="Write results.json, problems.csv and run logs here."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an evaluation written to this --out directory."),
    report: bool = typer.Option(False, "--report", help="Also write the HTML report, OUT/report.html."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    **flags: Any,
) -> None:
    """Evaluate on a dataset: accuracy per round (mean@N, majority, pass@N), tokens, calls and time."""
    from ._eval_view import run_eval

    preset, rsa_flags, backend_flags = split_flags(flags)
    with user_errors():
        target = resume or out
        if report and target is None:
            raise ConfigError("--report needs --out (or --resume): the report is made from the written results")
        params = build_params(preset, rsa_flags)
        run_eval(dataset, params, make_backend(**backend_flags), out=target, resume=resume is not None,
                 limit=limit, quiet=quiet, check=check_backend)
        if target is not None:
            err = Console(stderr=True, soft_wrap=True)
            if report:
                from markov_rsa.report import write_report

                err.print(f"wrote {write_report([target])}", highlight=False)
            else:
                err.print(f"HTML report: markov-rsa report {target}", highlight=False)


app.command("eval", help=evaluate.__doc__)(with_signature(evaluate, RUN_OPTIONS))


def report(
    paths: list[Path] = typer.Argument(
        ..., help="An eval --out directory or a run directory; two eval directories are compared."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="HTML file to write (default: report.html in the directory, compare.html for two)."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    text_limit: int = typer.Option(
        20_000, "--text-limit", help="Evaluation pages: characters of each rollout's text kept (start and end); 0 keeps all."
    ),
) -> None:
    """Write one self-contained HTML page (no network needed) for an evaluation, a run, or two evaluations."""
    from markov_rsa.report import write_report

    with user_errors():
        target = write_report(paths, output, text_limit=text_limit or None)
    Console(stderr=True, soft_wrap=True).print(f"wrote {target}", highlight=False)
    if open_browser:
        import webbrowser

        webbrowser.open(target.resolve().as_uri())


app.command("report", help=report.__doc__)(report)


def fake_backend(
    *,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8001, "--port", help="Port to listen on."),
    **flags: Any,
) -> None:
    """Run the simulated OpenAI-compatible backend (rule-based answers, token rate, faults)."""
    try:
        config = FakeBackendConfig(**{k: v for k, v in flags.items() if v is not None})
    except ValueError as err:
        raise fail(str(err).splitlines()[0], 2) from None
    Console(stderr=True).print(f"fake backend on http://{host}:{port}/v1 (model {config.model})")
    serve_fake_backend(config, host=host, port=port)


app.command("fake-backend", help=fake_backend.__doc__)(
    with_signature(fake_backend, model_options(FakeBackendConfig, "Simulation"))
)


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the OpenAI-compatible Markovian RSA proxy in front of --upstream URL (or --engine local).

    Every flag is listed by 'markov-rsa serve --help'.
    """
    from markov_rsa.server.__main__ import main as serve_main

    serve_main(ctx.args, prog="markov-rsa serve")


def main() -> None:
    """Entry point of the ``markov-rsa`` command."""
    app()


if __name__ == "__main__":
    main()
