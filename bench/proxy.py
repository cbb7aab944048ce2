"""Proxy overhead: pass-through latency and throughput against the simulated backend direct, and a
burst of concurrent RSA runs.

The simulated backend and the proxy each run in their own process; this process only generates
load, over raw keep-alive HTTP/1.1 connections (an HTTP client library would cost more CPU than
the proxy under test). All figures come from one run, so their ratios are comparable even on a
noisy machine.

    python bench/proxy.py [--clients 64] [--seconds 5] [--sequential 2000] [--rsa-runs 50]
                          [--rss-requests 5000] [--huge-mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROBLEM = "What is 17 + 25 * 3?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the {what} did not start")


def start_backend(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cli = str(Path(sys.executable).parent / "markov-rsa")
    command = [
        cli, "fake-backend", "--port", str(port), "--length-mean", str(args.length), "--length-sigma", "0.2",
        "--tokens-per-second", str(args.rate), "--request-log-limit", "1",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "simulated backend")
    return proc, url


def start_proxy(upstream: str, args: argparse.Namespace, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable, "-m", "markov_rsa.server", "--upstream", upstream + "/v1", "--port", str(port),
        "--log-level", "warning", "--max-concurrent-runs", str(max(64, args.rsa_runs)),
        "--concurrency", "512", *extra,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "proxy")
    return proc, url


# -- a minimal keep-alive HTTP/1.1 load generator ----------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


def _request(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_load(url: str, body: bytes, clients: int, *, seconds: float | None = None, count: int | None = None) -> Load:
    """``clients`` connections each sending requests back to back, for ``seconds`` or ``count`` requests."""
    host, port = url.removeprefix("http://").split(":")
    request = _request(host, int(port), body)
    load = Load()
    remaining = [count if count is not None else 1 << 62]
    deadline = time.perf_counter() + (seconds if seconds is not None else 1e9)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                started = time.perf_counter()
                writer.write(request)
                try:
                    status = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    load.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                load.statuses[status] = load.statuses.get(status, 0) + 1
                if status == 200:
                    load.latencies.append(time.perf_counter() - started)
                else:
                    load.errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.wall_s = time.perf_counter() - started
    return load


# -- a huge completion -------------------------------------------------------------------------------


def _huge_upstream(size: int, ports: Any) -> None:
    """A loopback upstream whose chat completions carry ``size`` bytes of text (run in a child process)."""
    body = json.dumps({
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant",
                                                                        "content": "x" * size + " \\boxed{42}"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": size // 4, "total_tokens": 10 + size // 4},
    }).encode()
    models = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                answer = body if b"/chat/completions" in head.split(b"\r\n", 1)[0] else models
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(answer))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(serve())


def serve_huge_completion(size: int) -> str:
    """A loopback upstream whose chat completions carry ``size`` bytes of text, in its own process:
    in a thread of this one, copying 50 MB into sockets would hold the interpreter lock that the
    /health measurements below need, and count its stalls against the proxy."""
    return serve_in_child(_huge_upstream, size)


def serve_in_child(target: Any, *args: Any) -> str:
    """Run ``target(*args, ports)`` in a child process; it puts the loopback port it listens on."""
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    multiprocessing.Process(target=target, args=(*args, ports), daemon=True).start()
    return f"http://127.0.0.1:{ports.get(timeout=60)}"


def health_during_huge_completion(args: argparse.Namespace, upstream: str, cap: int | None) -> None:
    """/health latency of a proxy while it handles one RSA run over a huge completion (``cap``: the
    proxy's --max-response-bytes; None: its default)."""
    extra = ("--max-response-bytes", str(cap)) if cap else ()
    proc, url = start_proxy(upstream, args, *extra, "--model", "m")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": PROBLEM}],
                "rsa": {"n": 2, "k": 2, "t": 2, "tail_tokens": 256, "max_tokens": 100}}
        box: dict[str, Any] = {}

        def run() -> None:
            started = time.perf_counter()
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
            box.update(status=reply.status_code, seconds=time.perf_counter() - started)

        worker = threading.Thread(target=run)
        rss_before = rss_mb(proc.pid)
        latencies = []
        rss_peak = rss_before
        with httpx.Client(timeout=30) as client:
            for _ in range(20):  # a warm connection and a warm handler, as in service
                client.get(url + "/health")
            worker.start()
            while worker.is_alive():
                started = time.perf_counter()
                client.get(url + "/health")
                latencies.append(time.perf_counter() - started)
                rss_peak = max(rss_peak, rss_mb(proc.pid))
                time.sleep(0.02)
        worker.join()
        latencies.sort()
        limit = f"--max-response-bytes {cap}" if cap else "the default --max-response-bytes"
        print(f"\n/health while the proxy handles an RSA run (N=2, T=2) over {args.huge_mb} MB completions, {limit}")
        print(f"  run: status {box.get('status')} in {box.get('seconds', float('nan')):.1f} s; /health answered "
              f"{len(latencies)} times, p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms (target < 100 ms); proxy RSS {rss_before:.0f} -> peak "
              f"{rss_peak:.0f} MiB")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- the floor: a byte relay ------------------------------------------------------------------------


def _byte_relay(upstream: str, ports: Any) -> None:
    """Forward each connection's bytes to ``upstream`` and back, nothing else (run in a child process)."""
    host, port = upstream.removeprefix("http://").split(":")

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    _uvloop()
    asyncio.run(serve())


def start_byte_relay(upstream: str) -> str:
    """A bare TCP relay in front of ``upstream``, in its own process: the least any proxy adds."""
    return serve_in_child(_byte_relay, upstream)


# -- RSA burst --------------------------------------------------------------------------------------


async def rsa_burst(proxy: str, runs: int, params: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "fake-reasoner", "messages": [{"role": "user", "content": PROBLEM}], "rsa": params}
    limits = httpx.Limits(max_connections=runs + 8)
    async with httpx.AsyncClient(base_url=proxy, timeout=600, limits=limits) as client:

        async def one() -> tuple[int, dict[str, Any], float]:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code, response.json(), time.perf_counter() - started

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(runs)), return_exceptions=True)
        wall = time.perf_counter() - started
    ok = [r for r in results if not isinstance(r, BaseException) and r[0] == 200]
    errors = [r if isinstance(r, BaseException) else r[1] for r in results if isinstance(r, BaseException) or r[0] != 200]
    calls = sum(r[1]["rsa"]["requests"] for r in ok)
    failed = sum(r[1]["rsa"]["failed"] for r in ok)
    return {
        "runs": runs,
        "ok": len(ok),
        "errors": len(errors),
        "first_error": str(errors[0])[:300] if errors else None,
        "upstream_calls": calls,
        "failed_rollouts": failed,
        "wall_s": wall,
        "run_p50_s": statistics.median(r[2] for r in ok) if ok else float("nan"),
    }


def measured(pids: dict[str, int], url: str, body: bytes, clients: int, **kwargs: Any) -> Load:
    """Run a load and record the CPU seconds each process spent on it."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    load = asyncio.run(run_load(url, body, clients, **kwargs))
    load.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    return load


def _uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="Concurrent clients of the throughput test.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Duration of each throughput test.")
    parser.add_argument("--sequential", type=int, default=2000, help="Requests of the one-client latency test.")
    parser.add_argument("--length", type=int, default=16, help="Tokens per simulated completion (pass-through).")
    parser.add_argument("--rate", type=float, default=0.0, help="Simulated tokens/s per stream (0: instant).")
    parser.add_argument("--rsa-runs", type=int, default=50, help="Concurrent RSA runs (N=8, K=4, T=2).")
    parser.add_argument("--rss-requests", type=int, default=5000, help="Pass-through requests of the memory check.")
    parser.add_argument("--huge-mb", type=int, default=50, help="Size of the huge completion (0: skip that check).")
    args = parser.parse_args()
    _uvloop()

    backend, backend_url = start_backend(args)
    proxy, proxy_url = start_proxy(backend_url, args)
    try:
        body = json.dumps(
            {"model": "fake-reasoner", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 64, "rsa": False}
        ).encode()
        direct_body = json.dumps(
            {"model": "fake-reasoner", "messages": [{"role": "user", "content": PROBLEM}], "max_tokens": 64}
        ).encode()
        print(f"simulated backend {backend_url} (pid {backend.pid}), proxy {proxy_url} (pid {proxy.pid}), "
              f"load generator pid {os.getpid()}, {os.cpu_count()} CPUs")
        asyncio.run(run_load(backend_url, direct_body, 8, count=500))  # warm-up
        asyncio.run(run_load(proxy_url, body, 8, count=500))

        pids = {"backend": backend.pid, "proxy": proxy.pid, "loadgen": os.getpid()}
        print(f"\npass-through, 1 client, {args.sequential} sequential requests")
        seq_direct = measured(pids, backend_url, direct_body, 1, count=args.sequential)
        seq_proxy = measured(pids, proxy_url, body, 1, count=args.sequential)
        _report(seq_direct, seq_proxy)
        relay_url = start_byte_relay(backend_url)
        seq_relay = asyncio.run(run_load(relay_url, direct_body, 1, count=args.sequential))
        print(f"  a bare byte relay on the same path adds p50 {seq_relay.pct(0.5) - seq_direct.pct(0.5):+.3f} ms: "
              "the rest of the proxy's figure is its work per request")

        print(f"\npass-through, {args.clients} concurrent clients, {args.seconds:g} s each")
        con_direct = measured(pids, backend_url, direct_body, args.clients, seconds=args.seconds)
        con_proxy = measured(pids, proxy_url, body, args.clients, seconds=args.seconds)
        _report(con_direct, con_proxy)

        rss_start = rss_mb(proxy.pid)
        asyncio.run(run_load(proxy_url, body, 16, count=args.rss_requests))
        print(f"\nproxy RSS {rss_start:.1f} MiB before and {rss_mb(proxy.pid):.1f} MiB after {args.rss_requests} "
              "more pass-through requests")

        params = {"n": 8, "k": 4, "t": 2, "tail_tokens": 64, "max_tokens": 256}
        print(f"\n{args.rsa_runs} concurrent RSA runs through the proxy, {params}")
        burst = asyncio.run(rsa_burst(proxy_url, args.rsa_runs, params))
        print(
            f"  completed {burst['ok']}/{burst['runs']}, errors {burst['errors']}, upstream calls {burst['upstream_calls']}, "
            f"failed rollouts {burst['failed_rollouts']}, wall {burst['wall_s']:.2f} s, run p50 {burst['run_p50_s']:.2f} s"
        )
        if burst["first_error"]:
            print(f"  first error: {burst['first_error']}")
        if args.huge_mb:
            huge = serve_huge_completion(args.huge_mb * 1024 * 1024)
            health_during_huge_completion(args, huge, None)
            health_during_huge_completion(args, huge, (args.huge_mb + 16) * 1024 * 1024)
    finally:
        for proc in (proxy, backend):
            proc.send_signal(signal.SIGINT)
        for proc in (proxy, backend):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _report(direct: Load, proxy: Load) -> None:
    print(
        f"  {'':8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}   CPU us/request: "
        f"{'backend':>8} {'proxy':>8} {'loadgen':>8}"
    )
    for name, load in (("direct", direct), ("proxy", proxy)):
        count = max(1, len(load.latencies))
        cpu = "".join(f"{load.cpu.get(p, float('nan')) / count * 1e6:9.0f}" for p in ("backend", "proxy", "loadgen"))
        print(f"  {name:8} {load.rps:9.0f} {load.pct(0.5):8.3f} {load.pct(0.99):8.3f} {load.errors:7d}{'':18}{cpu}")
    print(
        f"  added by the proxy: p50 {proxy.pct(0.5) - direct.pct(0.5):+.3f} ms, p99 {proxy.pct(0.99) - direct.pct(0.99):+.3f} ms; "
        f"throughput ratio proxy/direct {proxy.rps / direct.rps if direct.rps else float('nan'):.2f}"
    )


if __name__ == "__main__":
    main()
