"""Orchestration overhead: wall time against the ideal critical path, and CPU time per call.

The simulated backend runs in its own process at a fixed token rate with room for every rollout
at once, so the ideal wall time of a run is the sum over rounds of its slowest rollout. Whatever
the run takes beyond that is the orchestrator's overhead. Figures are ratios measured in one run.

    python bench/orchestration.py [--rate 400] [--length 400]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from markov_rsa import MarkovRSA, OpenAIBackend, RolloutFinished, RSAParams

PROBLEM = "What is 17 + 25 * 3?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_backend(rate: float, length: int, ttft: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cli = str(Path(sys.executable).parent / "markov-rsa")
    proc = subprocess.Popen(
        [cli, "fake-backend", "--port", str(port), "--tokens-per-second", str(rate), "--ttft-s", str(ttft),
         "--length-mean", str(length), "--length-sigma", "0.3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the simulated backend did not start")


async def measure(base_url: str, params: RSAParams, rate: float, ttft: float) -> dict[str, Any]:
    completion: dict[int, list[int]] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, RolloutFinished) and event.record.trace is not None:
            completion.setdefault(event.record.round, []).append(event.record.trace.usage.completion_tokens)

    async with OpenAIBackend(base_url, concurrency=params.n * 2) as backend:
        # Warm up: connections, the tokenizer probe, lazy imports of the answer checker.
        await MarkovRSA(backend, params.model_copy(update={"t": 2, "n": 2, "k": 2})).solve(PROBLEM)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    ideal = sum(ttft + max(tokens) / rate for tokens in completion.values())
    return {
        "T": params.t,
        "calls": result.calls,
        "wall_s": wall,
        "ideal_s": ideal,
        "ratio": wall / ideal,
        "cpu_ms_per_call": 1000 * cpu / result.calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=400.0, help="tokens per second per stream")
    parser.add_argument("--length", type=int, default=400, help="median reasoning length in tokens")
    parser.add_argument("--ttft", type=float, default=0.05, help="time to first token, seconds")
    args = parser.parse_args()
    proc, base_url = start_backend(args.rate, args.length, args.ttft)
    try:
        rows = []
        for t in (2, 4):
            params = RSAParams(n=16, k=4, t=t, tail_tokens=256, max_tokens=4096, seed=1, selection="majority")
            rows.append(asyncio.run(measure(base_url, params, args.rate, args.ttft)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"N=16 K=4, {args.rate:.0f} tok/s per stream, median length {args.length} tokens, concurrency 32")
    print(f"{'T':>3} {'calls':>6} {'wall s':>8} {'ideal s':>8} {'wall/ideal':>11} {'CPU ms/call':>12}")
    for row in rows:
        print(
            f"{row['T']:>3} {row['calls']:>6} {row['wall_s']:>8.3f} {row['ideal_s']:>8.3f} "
            f"{row['ratio']:>11.3f} {row['cpu_ms_per_call']:>12.2f}"
        )
    print("targets: wall/ideal <= 1.05, CPU < 2 ms per call")


if __name__ == "__main__":
    main()
