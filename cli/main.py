"""The ``markov-rsa`` command."""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from markov_rsa import (
    PRESET_TABLE,
    Backend,
    BackendError,
    BackendSettings,
    ConfigError,
    MarkovRSA,
    MarkovRSAError,
    OpenAIBackend,
    RSAParams,
    RSAResult,
    __version__,
)
from markov_rsa._datasets import Fields
from markov_rsa._loop import run as run_loop
from markov_rsa._runlog import LoggedRun, RunLog, read_run_log, resume_backend
from markov_rsa._settings import CONFIG_ENV, PRESET_ENV, Layers, make_backend
from markov_rsa.fake_backend import FakeBackendConfig
from markov_rsa.fake_backend import serve as serve_fake_backend
from markov_rsa.server import ServerConfig

from ._exits import EXIT_OK, EXIT_USAGE, fail, run_command, user_errors
from ._help import GroupedCommand
from ._options import given, model_options, with_signature
from ._progress import ProgressDisplay
from ._serve import SERVER_NESTED, serve_command

app = typer.Typer(
    name="markov-rsa",
    help="Markovian RSA test-time compute: N parallel reasoning traces, bounded tails, recursive aggregation.",
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)

RSA_PANEL = "RSA parameters"
BACKEND_PANEL = "Backend"
SERVER_PANEL = "Server"
OUTPUT_PANEL = "Output"

def _keyword(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


PRESET_OPTION = _keyword(
    "preset",
    Optional[str],
    typer.Option(
        None,
        "--preset",
        help="Start from a preset: "
        + "; ".join(f"{name} ({preset.source})" for name, preset in PRESET_TABLE.items())
        + f". [env: {PRESET_ENV}]",
        rich_help_panel=RSA_PANEL,
        show_default=False,
    ),
)
CONFIG_OPTION = _keyword(
    "config",
    Optional[str],
    typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="TOML file of settings (name = value); default: [tool.markov-rsa] of the nearest "
        f"pyproject.toml. [env: {CONFIG_ENV}]",
        show_default=False,
    ),
)
RSA_OPTIONS = [PRESET_OPTION, *model_options(RSAParams, RSA_PANEL)]
# solve and eval keep --api-key as a hidden spelling of the outbound key; serve's --api-key is inbound.
RUN_OPTIONS = [
    CONFIG_OPTION,
    *RSA_OPTIONS,
    *model_options(BackendSettings, BACKEND_PANEL, aliases={"backend_api_key": ["--api-key"]}),
]


def read_problem(problem: str | None) -> str:
    """The problem from the argument, or stdin for ``-`` or no argument on a pipe."""
    if problem is None or problem == "-":
        if problem is None and sys.stdin.isatty():
            raise ConfigError("no problem given: pass it as an argument, or '-' to read stdin")
        problem = sys.stdin.read()
    if not problem.strip():
        raise ConfigError("the problem is empty")
    return problem


@dataclass(frozen=True)
class RunSettings:
    """What a command that runs RSA is configured with."""

    params: RSAParams
    backend: BackendSettings
    layers: Layers


def load_run_settings(flags: dict[str, Any]) -> RunSettings:
    """RSA parameters and backend settings from the command's flags over environment, file, preset
    and defaults. With no backend the run is on the local engine, whose default preset is ``local``."""
    layers = Layers.discover(flags.pop("config", None))
    backend = layers.settings(BackendSettings, given(BackendSettings, flags))
    preset = layers.preset(flags.pop("preset", None))
    if preset is None and backend.is_local:
        preset = "local"
    return RunSettings(layers.rsa_params(preset, given(RSAParams, flags)), backend, layers)


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
        # Unreachable, TLS, refused: the run failed (exit 1), the command line was fine.
        raise BackendError(f"cannot use backend {backend.name}: {err}") from None


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
        None, "--run-dir", help="Log the run as JSONL in this directory, every rollout as it finishes.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue the run logged in this directory; only missing rollouts are generated.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    force: bool = typer.Option(
        False, "--force", help="With --resume: continue on a --backend or --model other than the log's.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: the result, or {\"error\": {...}} on failure.",
        rich_help_panel=OUTPUT_PANEL,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display.", rich_help_panel=OUTPUT_PANEL),
    **flags: Any,
) -> None:
    """Solve one problem with Markovian RSA and print the answer."""
    with user_errors(as_json):
        settings = load_run_settings(flags)
        logged = load_resume(resume) if resume else None
        if logged is not None:
            params, problem_or_messages, run_dir = logged.params, logged.messages, resume
        else:
            params = settings.params
            problem_or_messages = read_problem(problem)
        backend_settings = settings.backend
        if logged is not None:
            # A resumed run continues on the log's backend and model unless --force says otherwise.
            urls, model = resume_backend(logged, backend_settings.backend, backend_settings.model, force=force)
            backend_settings = backend_settings.model_copy(update={"backend": urls, "model": model})
        backend = make_backend(backend_settings)
        show = not quiet and not as_json and Console(stderr=True).is_terminal
        result = run_loop(run_solve(problem_or_messages, params, backend, show, run_dir, logged))
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write((result.answer if result.answer is not None else result.final_text.strip()) + "\n")


app.command("solve", help=solve.__doc__, cls=GroupedCommand)(with_signature(solve, RUN_OPTIONS))


def evaluate(
    dataset: str = typer.Argument(
        ...,
        metavar="NAME_OR_PATH",
        help="A built-in dataset (arith, gsm8k, math500), a .jsonl, .csv or .parquet file with id, problem, "
        "answer (and task) columns, or hf:ORG/NAME[:split] (a local directory or the Hugging Face cache).",
    ),
    *,
    problem_field: str = typer.Option("problem", "--problem-field", help="Column holding the problem."),
    answer_field: str = typer.Option("answer", "--answer-field", help="Column holding the right answer."),
    id_field: str = typer.Option("id", "--id-field", help="Column holding the problem's id (default: row number)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write results.json, problems.csv and run logs here.", rich_help_panel=OUTPUT_PANEL
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Only the first N problems."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an evaluation written to this --out directory.", rich_help_panel=OUTPUT_PANEL
    ),
    report: bool = typer.Option(
        False, "--report", help="Also write the HTML report, OUT/report.html.", rich_help_panel=OUTPUT_PANEL
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT_PANEL),
    **flags: Any,
) -> None:
    """Evaluate on a dataset: accuracy per round (mean@N, majority, pass@N), tokens, calls and time."""
    from ._eval_view import run_eval

    with user_errors():
        target = resume or out
        if report and target is None:
            raise ConfigError("--report needs --out (or --resume): the report is made from the written results")
        settings = load_run_settings(flags)
        run_eval(
            dataset, settings.params, make_backend(settings.backend), out=target,
            resume=resume is not None, limit=limit, quiet=quiet, check=check_backend,
            fields=Fields(problem=problem_field, answer=answer_field, id=id_field),
        )
        if target is not None:
            err = Console(stderr=True, soft_wrap=True)
            if report:
                from markov_rsa.report import write_report

                err.print(f"wrote {write_report([target])}", highlight=False)
            else:
                err.print(f"HTML report: markov-rsa report {target}", highlight=False)


app.command("eval", help=evaluate.__doc__, cls=GroupedCommand)(with_signature(evaluate, RUN_OPTIONS))


def report(
    paths: list[Path] = typer.Argument(
        ..., help="An eval --out directory or a run directory; two eval directories are compared."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="HTML file to write (default: report.html in the directory, compare.html for two)."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    text_limit: int = typer.Option(
        20_000, "--text-limit", min=0, help="Evaluation pages: characters of each rollout's text kept (start and end); 0 keeps all."
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


app.command("report", help=report.__doc__, cls=GroupedCommand)(report)


def fake_backend(
    *,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8001, "--port", min=1, max=65535, help="Port to listen on."),
    **flags: Any,
) -> None:
    """Run the simulated OpenAI-compatible backend (rule-based answers, token rate, faults)."""
    try:
        config = FakeBackendConfig(**given(FakeBackendConfig, flags))
    except ValueError as err:
        raise fail(str(err).splitlines()[0], EXIT_USAGE) from None
    Console(stderr=True).print(f"fake backend on http://{host}:{port}/v1 (model {config.model})")
    serve_fake_backend(config, host=host, port=port)


app.command("fake-backend", help=fake_backend.__doc__, cls=GroupedCommand)(
    with_signature(fake_backend, model_options(FakeBackendConfig, "Simulation", show_env=False))
)

SERVE_OPTIONS = [
    CONFIG_OPTION,
    PRESET_OPTION,
    # --rsa-<name>: Zyphra's proxy spells the RSA flags so; accepted, not listed.
    *model_options(RSAParams, RSA_PANEL, alias_prefix="rsa_"),
    *model_options(BackendSettings, BACKEND_PANEL),
    *model_options(ServerConfig, SERVER_PANEL, exclude=SERVER_NESTED, aliases={"client_api_keys": ["--api-key"]}),
]
app.command("serve", help=serve_command.__doc__, cls=GroupedCommand)(with_signature(serve_command, SERVE_OPTIONS))

serve_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)
"""``serve`` alone, for ``python -m markov_rsa.server``."""
serve_app.command(help=serve_command.__doc__, cls=GroupedCommand)(serve_command)


def version_callback(value: bool) -> None:
    """``--version``: print the version and exit."""
    if value:
        sys.stdout.write(f"markov-rsa {__version__}\n")
        raise typer.Exit(EXIT_OK)


@app.callback()
def common(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Markovian RSA test-time compute: N parallel reasoning traces, bounded tails, recursive aggregation."""


def main(argv: list[str] | None = None, prog_name: str = "markov-rsa") -> None:
    """Entry point of the ``markov-rsa`` command: exit 0 ok, 1 run failed, 2 usage error, 130 interrupted."""
    args = sys.argv[1:] if argv is None else list(argv)
    sys.exit(run_command(app, args, prog_name))


if __name__ == "__main__":
    main()
