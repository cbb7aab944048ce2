"""``markov-rsa report``: real evaluations on the simulated backend, rendered and loaded in a real
headless Chromium from ``file://``; nothing may be fetched and nothing may log an error."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import Chromium, Page, chromium, distinct_colours, find_chromium
from test_cli import assert_one_line_error, cli
from test_runlog import through_round_zero

from markov_rsa import call_seed
from markov_rsa._stats import mean_se, paired_difference
from markov_rsa.report import compare, load_eval, load_run

DATASET = Path(__file__).resolve().parent.parent / "datasets" / "arith.jsonl"
N, K, T = 4, 2, 3
ARGS = ["--n", str(N), "--k", str(K), "--t", str(T), "--tail-tokens", "40", "--max-tokens", "120", "--seed", "1", "-q"]
# Aggregation helps, a few traces run past the budget: every kind of cell shows up.
BACKEND = dict(length_mean=50, long_tail_rate=0.15, error_rate=0.5, follow_majority=0.85, aggregation_error_rate=0.3, seed=5)
INJECTED = '<img src="http://127.0.0.1:9/pixel.png"><script>console.error("injected")</script>'


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    """One headless Chromium for the module. Missing Chromium fails the tests (CI installs it);
    ``MARKOV_RSA_SKIP_BROWSER_TESTS=1`` skips them on a machine without it, never in CI."""
    executable = find_chromium()
    if executable is None:
        if os.environ.get("MARKOV_RSA_SKIP_BROWSER_TESTS") == "1" and not os.environ.get("CI"):
            pytest.skip("chromium is not installed and MARKOV_RSA_SKIP_BROWSER_TESTS=1")
        pytest.fail("chromium is not installed (apt-get install chromium); the report's tests need a real browser")
    with chromium(executable) as instance:
        yield instance


def test_browser_sees_requests_and_errors(tmp_path: Path, browser: Chromium) -> None:
    """The checks below are only as good as the harness: a page that fetches and logs is caught."""
    page_file = tmp_path / "leaky.html"
    page_file.write_text('<!doctype html><img src="http://127.0.0.1:9/pixel.png">'
                         '<script>console.error("boom"); undefined_name();</script>')
    page, url = open_page(browser, page_file)
    page.evaluate("new Promise(done => { const img = document.querySelector('img');"
                  " if (img.complete) done(); else img.onerror = img.onload = done; })")
    assert page.log.requests[0] == url and "http://127.0.0.1:9/pixel.png" in page.log.requests
    assert page.log.console_errors == ["boom"] and len(page.log.exceptions) == 1


def small_dataset(tmp_path: Path, count: int = 6) -> Path:
    """The first problems of datasets/arith.jsonl; the first one carries markup that must stay text."""
    lines = DATASET.read_text().splitlines()[:count]
    first = json.loads(lines[0])
    first["problem"] += " " + INJECTED
    lines[0] = json.dumps(first)
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_eval(server: Any, dataset: Path, out: Path, *extra: str) -> Any:
    proc = cli("eval", str(dataset), "--backend", server.base_url, *ARGS, "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def open_page(browser: Chromium, path: Path, width: int = 1280, height: int = 900, **kw: Any) -> tuple[Page, str]:
    page = browser.new_page()
    page.viewport(width, height, **kw)
    url = path.resolve().as_uri()
    page.goto(url)
    return page, url


def assert_clean(page: Page, url: str) -> None:
    """Only the document itself was requested, and nothing logged an error."""
    assert page.log.requests == [url], page.log.requests
    assert page.log.console_errors == [] and page.log.exceptions == [] and page.log.log_errors == [], page.log


def rollouts(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "run.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "rollout"]


def open_run_report(browser: Chromium, run_dir: Path) -> Page:
    """Write a run's page with the CLI and open it; it loads clean."""
    made = cli("report", str(run_dir))
    assert made.returncode == 0, made.stderr
    page, url = open_page(browser, run_dir / "report.html")
    assert_clean(page, url)
    return page


def click_shows(page: Page, record: dict[str, Any], field: str) -> None:
    """Clicking a rollout's cell shows the logged ``field`` of it in the detail panel."""
    page.evaluate(f"document.querySelector('.cell[data-k=\"{record['round']}-{record['slot']}\"]')"
                  ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    assert record[field] in page.evaluate("document.querySelector('.panel').textContent")


def test_eval_report_in_browser(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    server = fake_backend(**BACKEND)
    out = tmp_path / "eval"
    proc = run_eval(server, small_dataset(tmp_path), out, "--report")
    report = out / "report.html"
    assert f"wrote {report}" in proc.stderr
    problems = list(csv.DictReader((out / "problems.csv").open()))

    page, url = open_page(browser, report)
    assert_clean(page, url)
    # The problem × round grid, the selected-answer column, one embedded run per problem.
    assert page.evaluate("document.querySelectorAll('.eval-main .pcell').length") == len(problems) * T
    assert page.evaluate("document.querySelectorAll('.eval-main .fcell').length") == len(problems)
    sections = page.evaluate("[...document.querySelectorAll('.run-section')].map(s => s.dataset.run)")
    assert sections == [p["id"] for p in problems]
    cells = page.evaluate("[...document.querySelectorAll('.run-section')].map(s => s.querySelectorAll('.cell').length)")
    assert cells == [N * T] * len(problems)
    edges = page.evaluate("[...document.querySelectorAll('.run-section')].map(s => s.querySelectorAll('.edge').length)")
    assert edges == [N * (T - 1) * K] * len(problems)
    # One marker per chart point: 3 metrics × T rounds, with error bars, in each of the two charts.
    assert page.evaluate("document.querySelectorAll('.eval-main svg.chart .pt').length") == 2 * 3 * T
    # Markup in a problem is shown as text, never run or fetched.
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert INJECTED in page.evaluate("document.querySelector('#p0 .problem-text').textContent")
    assert distinct_colours(page.screenshot()) > 200

    # Dark mode follows the system setting.
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.color_scheme("dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark
    page.color_scheme("light")

    # A problem's row leads to its run, which shows only that run; a click shows a rollout's texts.
    page.go_to_fragment("p1")
    assert page.evaluate("document.querySelector('.eval-main').offsetParent === null")
    assert page.evaluate("document.querySelector('#p1').offsetParent !== null")
    assert page.evaluate("document.querySelector('#p0').offsetParent === null")
    run_dir = out / "runs" / problems[1]["id"]
    record = next(r for r in rollouts(run_dir) if r["round"] == 1 and r["slot"] == 0)
    page.evaluate("document.querySelector('#p1 .cell[data-k=\"1-0\"]').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    panel = page.evaluate("document.querySelector('#p1 .panel').textContent")
    assert record["content"].strip()[-40:] in panel
    assert f"slot {record['parents'][0]}" in panel
    # Hovering highlights the K edges to its parents.
    page.evaluate("document.querySelector('#p1 .cell[data-k=\"2-1\"]').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))")
    assert page.evaluate("document.querySelectorAll('#p1 .edge.hl').length") == K
    assert_clean(page, url)

    # Texts cut short for the page: the cut is stated, and the returned trace is still found.
    short = tmp_path / "short.html"
    assert cli("report", str(out), "-o", str(short), "--text-limit", "40").returncode == 0
    page, url = open_page(browser, short)
    assert_clean(page, url)
    majority = sum(1 for p in problems if json.loads((out / "runs" / p["id"] / "run.jsonl").read_text().splitlines()[-1])["selection"] == "majority")
    assert majority >= 1
    assert page.evaluate("[...document.querySelectorAll('.run-section')].filter(s => s.querySelectorAll('.cell.chosen').length === 1).length") == majority
    page.go_to_fragment("p1")
    page.evaluate("document.querySelector('#p1 .cell[data-k=\"1-0\"]').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    assert "characters omitted in this report" in page.evaluate("document.querySelector('#p1 .panel').textContent")

    # Phone width: the page itself does not scroll sideways (wide grids scroll in their own box).
    phone, _ = open_page(browser, report, 320, 700, mobile=True)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 320
    phone.go_to_fragment("p0")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 320


def test_results_json_provenance_and_report_numbers(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(**BACKEND)
    dataset = small_dataset(tmp_path, 8)
    out = tmp_path / "eval"
    proc = run_eval(server, dataset, out)
    assert f"markov-rsa report {out}" in proc.stderr
    assert not (out / "report.html").exists()
    results = json.loads((out / "results.json").read_text())
    prov = results["provenance"]
    assert prov["dataset"]["sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert prov["dataset"]["name"] == "small" and prov["seed"] == 1
    assert prov["backend"] == "openai-compatible" and prov["model"] == "fake-reasoner"
    assert prov["version"] and prov["date"].endswith("+00:00")
    assert "127.0.0.1" not in json.dumps(results)  # the backend's address is not recorded

    # The standard errors are over problems, from the per-problem values of problems.csv.
    rows = list(csv.DictReader((out / "problems.csv").open()))
    for r, row in enumerate(results["rounds"]):
        per_problem = [float(p[f"round{r}_mean_acc"]) for p in rows]
        assert row["mean_acc_se"] == pytest.approx(mean_se(per_problem).se, abs=1e-5)
    assert results["final_acc_se"] == pytest.approx(mean_se([float(p["correct"]) for p in rows]).se, abs=1e-5)

    # The report recomputes every number from the run logs with the evaluation's own scoring.
    report = load_eval(out)
    for row, expected in zip(report.rows, results["rounds"], strict=True):
        for metric in ("mean_acc", "majority_acc", "pass_at_n"):
            assert row.metrics[metric].mean == pytest.approx(expected[metric])
            assert row.metrics[metric].se == pytest.approx(expected[f"{metric}_se"], abs=1e-5)
        assert (row.tokens, row.calls) == (expected["tokens"], expected["calls"])
    assert report.final.mean == pytest.approx(results["final_acc"])


def test_run_report_in_browser(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    # Round 0 slot 2 fails however often it is retried: the grid shows a failed cell.
    server = fake_backend(**{**BACKEND, "fail_seeds": [call_seed(7, 0, 2)]})
    run_dir = tmp_path / "run"
    proc = cli("solve", "What is 58 + 16 + 11?", "--backend", server.base_url, "--n", "6", "--k", "3", "--t", str(T),
               "--tail-tokens", "40", "--max-tokens", "120", "--seed", "7", "--max-retries", "0", "-q",
               "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "pages" / "run.html"
    made = cli("report", str(run_dir), "-o", str(target))
    assert made.returncode == 0, made.stderr
    logged = rollouts(run_dir)

    page, url = open_page(browser, target)
    assert_clean(page, url)
    run_id = logged[0]["run"]
    assert run_id and run_id in page.evaluate("document.querySelector('.meta').textContent")
    assert "fake-reasoner" in page.evaluate("document.querySelector('.meta').textContent")
    assert page.evaluate("document.querySelectorAll('.cell').length") == 6 * T
    assert page.evaluate("document.querySelectorAll('.cell.st-failed').length") == sum(1 for r in logged if r["error"])
    assert page.evaluate("document.querySelectorAll('.cell.st-failed').length") >= 1
    capped = sum(1 for r in logged if r.get("finish_reason") == "length")
    assert page.evaluate("document.querySelectorAll('.cell.capped').length") == capped
    assert page.evaluate("document.querySelectorAll('.votes .vbar').length") == T
    assert page.evaluate("document.querySelectorAll('.cell.chosen').length") == 1
    assert distinct_colours(page.screenshot()) > 200

    # The tail a parent shows is exactly what one of its children was shown.
    run = load_run(run_dir)
    child = next(r for r in logged if r["round"] == 1 and not r["error"])
    parent = run.rounds[0][child["parents"][0]]
    assert parent is not None and parent.tail == child["shown_tails"][0]
    page.evaluate(f"document.querySelector('.cell[data-k=\"0-{parent.slot}\"]').dispatchEvent(new MouseEvent('click', {{bubbles: true}}))")
    shown = page.evaluate("document.querySelector('.panel pre').textContent")
    assert shown == parent.tail
    assert_clean(page, url)

    # On a phone the grid scrolls in its own box; the page does not scroll sideways.
    phone, _ = open_page(browser, target, 320, 700, mobile=True)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 320
    assert phone.evaluate("document.querySelector('svg.graph').getBoundingClientRect().width") > 320


def test_two_evaluations_side_by_side(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    server = fake_backend(**BACKEND)
    dataset = small_dataset(tmp_path, 8)
    a, b = tmp_path / "one-round", tmp_path / "three-rounds"
    proc = cli("eval", str(dataset), "--backend", server.base_url, *ARGS, "--t", "1", "--out", str(a))
    assert proc.returncode == 0, proc.stderr
    run_eval(server, dataset, b)
    made = cli("report", str(a), str(b))
    assert made.returncode == 0, made.stderr
    target = a / "compare.html"

    def correct(folder: Path) -> dict[str, float]:
        return {row["id"]: float(row["correct"]) for row in csv.DictReader((folder / "problems.csv").open())}

    ca, cb = correct(a), correct(b)
    ids = sorted(ca)
    expected = paired_difference([ca[i] for i in ids], [cb[i] for i in ids])
    comparison = compare(load_eval(a), load_eval(b))
    final = comparison.differences[0]
    assert final.metric == "final_acc" and final.diff.n == len(ids)
    assert final.diff.mean == pytest.approx(expected.mean) and final.diff.se == pytest.approx(expected.se)

    page, url = open_page(browser, target)
    assert_clean(page, url)
    text = page.evaluate("document.body.textContent")
    assert f"{100 * expected.mean:+.1f} pt" in text
    # One row per compared metric: the selected answers, then 3 metrics for the one shared round.
    assert page.evaluate("document.querySelectorAll('table')[0].querySelectorAll('tr').length") == 1 + 1 + 3
    assert page.evaluate("document.querySelectorAll('svg.ibar').length") == 1 + 3
    # The interval of the selected answers' difference is drawn around its mean, coloured when it excludes 0.
    low, high = expected.mean - expected.ci95, expected.mean + expected.ci95
    assert page.evaluate("document.querySelector('svg.ibar').classList.contains('diff-pos')") == (low > 0)
    assert page.evaluate("(() => { const s = document.querySelector('svg.ibar'); const r = s.querySelector('.range');"
                         " const x = +s.querySelector('circle').getAttribute('cx');"
                         " return +r.getAttribute('x1') <= x && x <= +r.getAttribute('x2'); })()")
    # Both evaluations' curves: 3 metrics × (1 + 3) rounds in each chart.
    assert page.evaluate("document.querySelectorAll('svg.chart')[0].querySelectorAll('.pt').length") == 3 * (1 + T)
    assert page.evaluate("document.querySelectorAll('tr.changed').length") >= 1  # t differs
    assert distinct_colours(page.screenshot()) > 200
    phone, _ = open_page(browser, target, 320, 700, mobile=True)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 320


def test_report_bad_paths(tmp_path: Path) -> None:
    assert_one_line_error(cli("report", str(tmp_path / "missing")), "not a directory")
    assert_one_line_error(cli("report", str(tmp_path)), "neither an evaluation")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.jsonl").write_text("")
    (tmp_path / "results.json").write_text("{}")
    assert_one_line_error(cli("report", str(tmp_path), str(run)), "two evaluation directories")
    assert_one_line_error(cli("eval", str(DATASET), "--backend", "http://127.0.0.1:9/v1", "--report"), "--out")


def test_run_report_shows_verifier_and_early_stop(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    # Many traces run past the budget with no answer (the math verifier excludes them), and the
    # right answer is common enough that early_stop ends the run before its last round.
    server = fake_backend(length_mean=40, long_tail_rate=0.35, error_rate=0.1, follow_majority=0.9,
                          aggregation_error_rate=0.1, seed=2)
    run_dir = tmp_path / "run"
    proc = cli("solve", "What is 2 * 7 - 3?", "--backend", server.base_url, "--n", "8", "--k", "2", "--t", "4",
               "--tail-tokens", "40", "--max-tokens", "120", "--seed", "3", "--verifier", "math",
               "--early-stop", "0.5", "-q", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    result = next(r for r in map(json.loads, (run_dir / "run.jsonl").read_text().splitlines()) if r["type"] == "result")
    assert result["stopped_early"] is not None and len(result["rounds"]) < 4
    # Rollouts of the next round may have finished before the stop (dataflow starts them early);
    # they are in the log, but the page shows the rounds of the result.
    excluded = [r for r in rollouts(run_dir) if r.get("excluded") and r["round"] < len(result["rounds"])]
    assert excluded
    page = open_run_report(browser, run_dir)
    assert page.evaluate("document.querySelectorAll('.cell').length") == 8 * len(result["rounds"])
    assert page.evaluate("document.querySelectorAll('.cell.excluded').length") == len(excluded)
    assert "stopped after round" in page.evaluate("document.body.textContent")
    click_shows(page, excluded[0], "excluded")


def test_unfinished_and_unreadable_runs(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    server = fake_backend(**BACKEND)
    out = tmp_path / "eval"
    run_eval(server, small_dataset(tmp_path, 3), out)
    problems = [row["id"] for row in csv.DictReader((out / "problems.csv").open())]
    # One run killed after its first round, one whose log is no run log at all.
    cut = out / "runs" / problems[1] / "run.jsonl"
    cut.write_text("\n".join(through_round_zero(cut.read_text().splitlines())[0]) + "\n")
    (out / "runs" / problems[2] / "run.jsonl").write_text("not json\n")
    made = cli("report", str(out), "-o", str(tmp_path / "page.html"))
    assert made.returncode == 0, made.stderr

    page, url = open_page(browser, tmp_path / "page.html")
    assert_clean(page, url)
    assert page.evaluate("document.querySelectorAll('.run-section').length") == 2
    assert page.evaluate("document.querySelectorAll('#p1 .cell.st-missing').length") == N * (T - 1)
    assert page.evaluate("document.querySelectorAll('#p1 .cell:not(.st-missing)').length") == N
    assert page.evaluate("document.querySelectorAll('.eval-main .fcell.m-error').length") == 1
    text = page.evaluate("document.body.textContent")
    assert f"Run log of {problems[2]} unreadable" in text and "has not finished" in text


def test_run_report_shows_calls_fitted_to_the_context(fake_backend: Any, tmp_path: Path, browser: Chromium) -> None:
    # A context too small for the aggregation prompts plus their budget: those calls are fitted.
    server = fake_backend(length_mean=40, error_rate=0.0, aggregation_error_rate=0.0, max_model_len=300)
    run_dir = tmp_path / "run"
    proc = cli("solve", "What is 6 * 7?", "--backend", server.base_url, "--n", "4", "--k", "2", "--t", "2",
               "--tail-tokens", "60", "--max-tokens", "200", "--seed", "1", "-q", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    fitted = [r for r in rollouts(run_dir) if r.get("fitted")]
    assert fitted
    click_shows(open_run_report(browser, run_dir), fitted[0], "fitted")
