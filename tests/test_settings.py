"""Settings: one model per concern, read from defaults < config file < environment < flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from markov_rsa import BackendSettings, ConfigError, RSAParams
from markov_rsa._settings import ConfigFile, Layers, env_name
from markov_rsa.cli._serve import server_config
from markov_rsa.cli.main import load_run_settings
from markov_rsa.server import ServerConfig, ServerSettings

CLI = str(Path(sys.executable).parent / "markov-rsa")

# One field of each model, with a value for each layer: (model, field, default, file, env, flag).
FIELDS = [
    (RSAParams, "n", 16, 8, 6, 4),
    (BackendSettings, "max_retries", 4, 7, 2, 0),
    (ServerSettings, "port", 8100, 8201, 8202, 8203),
]
LAYERS = ["default", "file", "env", "flag"]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MARKOV_RSA_"):
            monkeypatch.delenv(name)


def _flags(**given: Any) -> dict[str, Any]:
    """A command's keyword arguments as Typer hands them over: every option, None when not given."""
    return {"config": None, "preset": None, **given}


@pytest.mark.parametrize("top", LAYERS)
@pytest.mark.parametrize("command", ["solve", "serve"])
def test_precedence_default_file_env_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, top: str
) -> None:
    _clean_env(monkeypatch)
    fields = FIELDS if command == "serve" else FIELDS[:2]
    depth = LAYERS.index(top)
    lines = ['backend = "http://127.0.0.1:9/v1"'] if command == "serve" else []
    flags: dict[str, Any] = {}
    for _, name, _, in_file, in_env, in_flag in fields:
        if depth >= 1:
            lines.append(f"{name} = {in_file}")
        if depth >= 2:
            monkeypatch.setenv(env_name(name), str(in_env))
        if depth >= 3:
            flags[name] = in_flag
    # The [tool.markov-rsa] table of the nearest pyproject.toml above the working directory.
    (tmp_path / "pyproject.toml").write_text("[tool.markov-rsa]\n" + "\n".join(lines) + "\n")
    work = tmp_path / "sub" / "dir"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    if command == "serve":
        config, _ = server_config(_flags(**flags))
        found = {"n": config.defaults.n, "max_retries": config.upstream.max_retries, "port": config.port}
    else:
        settings = load_run_settings(_flags(backend=["http://127.0.0.1:9/v1"], **flags))
        found = {"n": settings.params.n, "max_retries": settings.backend.max_retries}
    for _, name, default, in_file, in_env, in_flag in fields:
        assert found[name] == [default, in_file, in_env, in_flag][depth], name


def test_config_file_flag_and_dashed_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "markov-rsa.toml"
    path.write_text('preset = "smoke"\ntail-tokens = 99\nbackend = ["http://a:1/v1", "http://b:2/v1"]\n')
    config, _ = server_config(_flags(config=str(path)))
    assert config.defaults.tail_tokens == 99 and config.defaults.n == 4  # smoke's n, the file's tail
    assert config.upstream.backend == ["http://a:1/v1", "http://b:2/v1"]


def test_bad_env_named_only_when_not_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKOV_RSA_N", "abc")
    monkeypatch.setenv("MARKOV_RSA_PORT", "99999")
    with pytest.raises(ConfigError, match="^MARKOV_RSA_N: "):
        load_run_settings(_flags(backend=["http://x:1/v1"]))
    assert load_run_settings(_flags(backend=["http://x:1/v1"], n=2, k=1)).params.n == 2
    with pytest.raises(ConfigError, match="^MARKOV_RSA_PORT: .*65535"):
        server_config(_flags(backend=["http://x:1/v1"], n=2, k=1))
    assert server_config(_flags(backend=["http://x:1/v1"], n=2, k=1, port=1))[0].port == 1


def test_bad_file_value_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    path = tmp_path / "c.toml"
    path.write_text("max_retries = -1\n")
    with pytest.raises(ConfigError, match=r"c\.toml: max_retries: .*greater than or equal to 0"):
        Layers(ConfigFile.read(path)).settings(BackendSettings, {})
    path.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'no_such_setting'"):
        ConfigFile.read(path)


def test_setting_names_are_unique_across_models() -> None:
    names = [*RSAParams.model_fields, *BackendSettings.model_fields, *ServerSettings.model_fields]
    assert len(names) == len(set(names))


def test_server_config_keeps_older_keywords() -> None:
    config = ServerConfig(upstreams=["http://a:1/v1/"], api_keys=["k"], upstream_timeout=5.0, model="m")
    assert config.upstream.backend == ["http://a:1/v1"] and config.upstream.timeout == 5.0
    assert config.upstream.model == "m" and config.client_api_keys == ["k"]
    assert "'k'" not in repr(config)


def test_backend_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructed directly (Python API), a settings model reads MARKOV_RSA_* and older spellings."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("MARKOV_RSA_UPSTREAMS", "http://a:1/v1, http://b:2/v1")
    monkeypatch.setenv("MARKOV_RSA_API_KEY", "secret")
    monkeypatch.setenv("MARKOV_RSA_RPS", "1.5")
    settings = BackendSettings()
    assert settings.backend == ["http://a:1/v1", "http://b:2/v1"]
    assert settings.backend_api_key == "secret" and settings.rps == 1.5
    assert BackendSettings(rps=3).rps == 3


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKOV_RSA_")}
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}, cwd=cwd
    )


@pytest.mark.parametrize("command", [[], ["solve"], ["eval"], ["serve"], ["fake-backend"], ["report"]])
def test_help_at_80_columns_keeps_flag_names_whole(command: list[str]) -> None:
    proc = run(*command, "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in proc.stdout
    flags = {word.rstrip(",") for line in lines for word in line.split() if word.startswith("--")}
    if command in (["solve"], ["serve"]):
        for name in (*RSAParams.model_fields, *BackendSettings.model_fields):
            assert "--" + name.replace("_", "-") in flags, name
        assert "[env: MARKOV_RSA_FINAL_MAX_TOKENS]" in proc.stdout.replace("\n" + " " * 34, " ")
        assert "RSA parameters:" in proc.stdout and "Backend:" in proc.stdout
    if command == ["serve"]:
        assert "Server:" in proc.stdout and "--rsa-n" not in flags and "--api-key" not in flags
        for name in ServerSettings.model_fields:
            assert "--" + name.replace("_", "-") in flags, name


def test_python_m_entry_points() -> None:
    for module in ("markov_rsa", "markov_rsa.server"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr
    version = subprocess.run([sys.executable, "-m", "markov_rsa", "--version"], capture_output=True, text=True)
    from markov_rsa import __version__

    assert version.stdout.strip() == f"markov-rsa {__version__}"


def test_exit_codes_and_json_error_object(fake_backend: Any) -> None:
    server = fake_backend(length_mean=30)
    ok = run("solve", "What is 2 + 2?", "--backend", server.base_url, "--preset", "smoke", "--json")
    assert ok.returncode == 0, ok.stderr
    # Usage errors: a bad flag value (click), a bad setting (pydantic), an unknown flag.
    for args, param in ((["--n", "abc"], "n"), (["--k", "9", "--n", "2"], None), (["--no-such-flag"], None)):
        proc = run("solve", "x", "--backend", server.base_url, "--json", *args)
        assert proc.returncode == 2, proc.stderr
        error = json.loads(proc.stdout)["error"]
        assert error["type"] == "usage_error" and error["code"] == 2 and error["message"]
        if param:
            assert error["param"] == param
    # The run failed: nothing listens on port 9.
    down = run("solve", "x", "--backend", "http://127.0.0.1:9/v1", "--json")
    assert down.returncode == 1
    assert json.loads(down.stdout)["error"]["type"] == "run_failed"
    assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    # MARKOV_RSA_N=abc is fine when --n overrides it.
    fine = run("solve", "What is 2 + 2?", "--backend", server.base_url, "--preset", "smoke", "--n", "2", "--k", "1",
               env={"MARKOV_RSA_N": "abc"})
    assert fine.returncode == 0, fine.stderr
    assert run("solve", "x", "--backend", server.base_url, env={"MARKOV_RSA_N": "abc"}).stderr.startswith(
        "error: MARKOV_RSA_N:"
    )
    assert run().returncode == 2  # no arguments: the help, as a usage error


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "0"], "--port"),
        (["--max-retries", "-1"], "--max-retries"),
        (["--tokenizer", "/no/such/tokenizer.json"], "tokenizer not found"),
        (["--log-format", "xml"], "--log-format"),
    ],
)
def test_serve_rejects_bad_settings_at_start(args: list[str], needle: str) -> None:
    proc = run("serve", "--backend", "http://127.0.0.1:9/v1", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_garbage_tokenizer_file_is_an_error_at_start(tmp_path: Path, fake_backend: Any) -> None:
    pytest.importorskip("tokenizers")
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("this is not a tokenizer")
    server = fake_backend()
    proc = run("solve", "x", "--backend", server.base_url, "--tokenizer", str(garbage))
    assert proc.returncode == 2 and "cannot load tokenizer" in proc.stderr, proc.stderr
    assert server.stats.requests == 0


def test_eval_out_that_cannot_be_written_fails_before_the_first_call(tmp_path: Path, fake_backend: Any) -> None:
    server = fake_backend()
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"id": "a", "problem": "What is 1 + 1?", "answer": "2"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run("eval", str(dataset), "--backend", server.base_url, "--preset", "smoke", "--out", str(blocker / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(blocker) in proc.stderr
    assert server.stats.requests == 0


@pytest.mark.parametrize("rate", [0.25, 0.5, 1.0, 1.5, 2.7, 40.0, 333.3])
def test_rps_keeps_fractions(rate: float) -> None:
    from markov_rsa._http import rate_throttler

    throttle = rate_throttler(rate)
    assert throttle.rate_limit >= 1 and throttle.period <= max(10.0, 1 / rate)
    assert throttle.rate_limit / throttle.period == pytest.approx(rate, rel=0.01)


def test_python_api_takes_backend_settings(fake_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from markov_rsa import solve

    _clean_env(monkeypatch)
    server = fake_backend(length_mean=30, error_rate=0.0, aggregation_error_rate=0.0)
    monkeypatch.setenv("MARKOV_RSA_BACKEND", server.base_url)
    result = solve("What is 6 * 7?", backend=BackendSettings(max_retries=0), preset="smoke", seed=1)
    assert result.answer == "42" and result.calls == server.stats.requests
    with pytest.raises(ConfigError, match="backend"):
        solve("x", backend="ftp://nowhere", preset="smoke")


def test_all_rollouts_failed_exits_1(fake_backend: Any) -> None:
    server = fake_backend(fault_rate_drop=1.0)
    proc = run("solve", "x", "--backend", server.base_url, "--preset", "smoke", "--max-retries", "0", "--json")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "run_failed"
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_interrupt_exits_130(fake_backend: Any) -> None:
    import signal

    server = fake_backend(fault_rate_hang=1.0)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKOV_RSA_")}
    proc = subprocess.Popen(
        [CLI, "solve", "x", "--backend", server.base_url, "--preset", "smoke", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base,
        # A suite started in the background of a non-interactive shell ignores SIGINT, and so would
        # the CLI it starts (Python keeps an inherited "ignore"): give the child the default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Wait until the run is under way (its first rollouts reached the server), then interrupt it.
        # The bound is generous: a busy machine can take long to start the CLI, and interrupting it
        # before the run began would test a different path.
        polls = 6000
        while server.stats.requests < 1 and polls:
            assert proc.poll() is None, proc.communicate()
            threading_event_wait(0.05)
            polls -= 1
        assert server.stats.requests >= 1, "the run never reached the backend"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert json.loads(out)["error"]["type"] == "interrupted"
    assert "Traceback" not in err and err.strip().endswith("interrupted")


def threading_event_wait(seconds: float) -> None:
    """Yield the CPU while polling a counter of another process's progress."""
    import threading

    threading.Event().wait(seconds)


def _parsed(app: Any, args: list[str]) -> dict[str, Any]:
    """The keyword arguments a command would be called with for ``args`` (flags parsed, nothing run)."""
    import typer

    command = typer.main.get_command(app)
    return dict(command.make_context("cmd", list(args)).params)


def test_older_spellings_are_hidden_aliases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from markov_rsa.cli.main import serve_app

    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKOV_RSA_SERVE_API_KEYS", "env-key")
    args = ["--upstream", "http://a:1/v1", "--backend", "http://b:2/v1", "--api-key", "in-1", "--client-api-keys",
            "in-2", "--upstream-api-key", "out", "--rsa-n", "8", "--k", "2", "--no-rsa-by-default"]
    config, _ = server_config(_parsed(serve_app, args))
    assert sorted(config.upstream.backend) == ["http://a:1/v1", "http://b:2/v1"]
    assert sorted(config.client_api_keys) == ["in-1", "in-2"] and config.upstream.backend_api_key == "out"
    assert (config.defaults.n, config.defaults.k, config.rsa_by_default) == (8, 2, False)
    assert server_config(_parsed(serve_app, ["--backend", "http://b:2/v1"]))[0].client_api_keys == ["env-key"]
