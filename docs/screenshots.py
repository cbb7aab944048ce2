"""Make the README's screenshots of the HTML report: python docs/screenshots.py

Runs two evaluations of datasets/arith.jsonl on the simulated backend, writes the evaluation,
run and comparison pages with ``markov-rsa report``, and photographs them in headless Chromium.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _browser import chromium, find_chromium, save  # noqa: E402

from markov_rsa.fake_backend import FakeBackend, FakeBackendConfig  # noqa: E402

CLI = str(Path(sys.executable).parent / "markov-rsa")
BACKEND = dict(error_rate=0.5, follow_majority=0.8, aggregation_error_rate=0.3, length_mean=60, long_tail_rate=0.1, seed=3)
RSA = ["--n", "8", "--k", "4", "--tail-tokens", "40", "--max-tokens", "120", "--seed", "1", "-q"]


def run(*args: str) -> None:
    print("$ markov-rsa", shlex.join(args))
    subprocess.run([CLI, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    executable = find_chromium()
    if executable is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    server = FakeBackend(FakeBackendConfig(**BACKEND)).start()
    work = Path(tempfile.mkdtemp(prefix="markov-rsa-docs-"))
    try:
        one, three = work / "arith-t1", work / "arith-t3"
        url = server.base_url
        run("eval", "datasets/arith.jsonl", "--backend", url, *RSA, "--t", "3", "--out", str(three), "--report")
        run("eval", "datasets/arith.jsonl", "--backend", url, *RSA, "--t", "1", "--out", str(one))
        run("report", str(three / "runs" / "arith-002"), "-o", str(work / "run.html"))
        run("report", str(one), str(three), "-o", str(work / "compare.html"))
        shots = [
            (three / "report.html", "report-eval.png", "light", 1500),
            (work / "run.html", "report-run.png", "light", 1300),
            (work / "compare.html", "report-compare.png", "dark", 1400),
        ]
        with chromium(executable) as browser:
            for page_file, name, scheme, height in shots:
                page = browser.new_page()
                page.viewport(1280, 900)
                page.color_scheme(scheme)
                page.goto(page_file.resolve().as_uri())
                if name == "report-run.png":  # show a rollout's details and its parents
                    page.evaluate("document.querySelector('.cell[data-k=\"2-1\"]').dispatchEvent(new MouseEvent('click', {bubbles: true}));"
                                  "document.querySelector('.cell[data-k=\"2-1\"]').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))")
                print("wrote", save(page.screenshot(full_page=True, max_height=height), ROOT / "docs" / name))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
