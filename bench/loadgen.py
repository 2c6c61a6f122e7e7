"""Drive a request file at the servers and measure: wrk, or a Python fallback.

``run_load`` uses wrk with ``bench/wrk/sign.lua`` when wrk is installed, pinned with
``taskset`` to the CPUs given; otherwise several Python processes (uvloop, raw HTTP/1.1
keep-alive connections, each request sent as pre-built bytes) do the same job, slower.
Either way the result has the same shape (``LoadResult``) and says which tool ran.

``python -m bench.loadgen FILE ADDRS DURATION CONNECTIONS DELAY_MS INDEX OF OUT`` is one
fallback process (internal).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA_SCRIPT = Path(__file__).parent / "wrk" / "sign.lua"
PERCENTILES = ("50", "90", "95", "99", "99.9")


@dataclass
class LoadResult:
    """One timed window as the load generator saw it."""

    tool: str
    requests: int
    duration_s: float
    rps: float
    latency_ms: dict[str, float]
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    wraps: int
    loadgen_cpu_s: float
    loadgen_cpus: str
    connections: int
    threads: int
    paced_delay_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As stored in the results file."""
        return asdict(self)


def wrk_available() -> bool:
    """Whether ``wrk`` is on PATH."""
    return shutil.which("wrk") is not None


def taskset_argv(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` when CPUs are given and taskset exists (else nothing)."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus]
    return []


def wait_cpu_seconds(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``proc`` (killed after ``timeout`` seconds); return its user + system
    CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)


def run_wrk(
    request_file: Path,
    addrs: list[str],
    *,
    duration: float,
    connections: int,
    threads: int,
    cpus: str | None,
    delay_ms: float = 0.0,
) -> LoadResult:
    """One wrk run; thread i connects to ``addrs[i % len(addrs)]``."""
    threads = max(threads, 1)
    connections = max(connections, threads)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        out = Path(tmp) / "summary.json"
        env = {
            **os.environ,
            "BENCH_WRK_REQUESTS": str(request_file),
            "BENCH_WRK_THREADS": str(threads),
            "BENCH_WRK_ADDRS": ",".join(addrs),
            "BENCH_WRK_DELAY_MS": f"{delay_ms:.3f}",
            "BENCH_WRK_OUT": str(out),
        }
        argv = [
            *taskset_argv(cpus),
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(LUA_SCRIPT),
            f"http://{addrs[0]}/",
        ]
        log = Path(tmp) / "wrk.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(  # noqa: S603
                argv, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
            cpu = wait_cpu_seconds(proc, duration + 120)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({proc.returncode}): {log.read_text()[-2000:]}")
        summary = json.loads(out.read_text())
    lat = summary["latency_us"]
    seconds = summary["duration_us"] / 1e6
    return LoadResult(
        tool="wrk",
        requests=summary["requests"],
        duration_s=seconds,
        rps=summary["requests"] / seconds if seconds else 0.0,
        latency_ms={
            **{p: lat["percentiles"][p] / 1000 for p in PERCENTILES},
            "mean": lat["mean"] / 1000,
            "max": lat["max"] / 1000,
        },
        statuses={str(k): v for k, v in sorted(summary["statuses"].items())},
        socket_errors={k: v for k, v in summary["errors"].items() if k != "status"},
        wraps=summary["wraps"],
        loadgen_cpu_s=cpu,
        loadgen_cpus=cpus or "any",
        connections=connections,
        threads=threads,
        paced_delay_ms=delay_ms,
    )


# --- the Python fallback ---


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[rank]


def run_python(
    request_file: Path,
    addrs: list[str],
    *,
    duration: float,
    connections: int,
    processes: int,
    cpus: str | None,
    delay_ms: float = 0.0,
) -> LoadResult:
    """The fallback: ``processes`` Python load generators sharing ``connections``."""
    processes = max(1, min(processes, connections))
    with tempfile.TemporaryDirectory(prefix="bench-py-") as tmp:
        procs = []
        for index in range(processes):
            conns = connections // processes + (1 if index < connections % processes else 0)
            out = Path(tmp) / f"out{index}.json"
            argv = [
                *taskset_argv(cpus),
                sys.executable,
                "-m",
                "bench.loadgen",
                str(request_file),
                ",".join(addrs),
                str(duration),
                str(conns),
                str(delay_ms),
                str(index),
                str(processes),
                str(out),
            ]
            procs.append((subprocess.Popen(argv), out))  # noqa: S603
        cpu = sum(wait_cpu_seconds(p, duration + 120) for p, _ in procs)
        parts = [json.loads(out.read_text()) for _, out in procs]
    latencies = sorted(v for part in parts for v in part["latencies_ms"])
    statuses: dict[str, int] = {}
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    for part in parts:
        for k, v in part["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in part["errors"].items():
            errors[k] = errors.get(k, 0) + v
    seconds = max(part["duration_s"] for part in parts)
    return LoadResult(
        tool="python",
        requests=len(latencies),
        duration_s=seconds,
        rps=len(latencies) / seconds if seconds else 0.0,
        latency_ms={
            **{p: _percentile(latencies, float(p)) for p in PERCENTILES},
            "mean": sum(latencies) / len(latencies) if latencies else 0.0,
            "max": latencies[-1] if latencies else 0.0,
        },
        statuses=dict(sorted(statuses.items())),
        socket_errors=errors,
        wraps=sum(part["wraps"] for part in parts),
        loadgen_cpu_s=cpu,
        loadgen_cpus=cpus or "any",
        connections=connections,
        threads=processes,
        paced_delay_ms=delay_ms,
    )


async def _read_response(reader: asyncio.StreamReader) -> str:
    """Read one HTTP/1.1 response; return its status code.

    Bodies framed by Content-Length or chunked encoding are both consumed, so
    the next response starts at a status line. Anything else raises ValueError.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError("not a status line")
    length = 0
    chunked = False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return parts[1].decode()


async def _one_connection(
    addr: str,
    requests: list[bytes],
    cursor: list[int],
    stop_at: float,
    delay_ms: float,
    stats: dict[str, Any],
) -> None:
    """Send requests on one connection until stop_at, reconnecting after errors."""
    host, _, port = addr.rpartition(":")
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            stats["errors"]["connect"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < stop_at:
                if delay_ms:
                    await asyncio.sleep(random.random() * 2 * delay_ms / 1000)  # noqa: S311
                cursor[0] += 1
                if cursor[0] >= len(requests):
                    cursor[0] = 0
                    stats["wraps"] += 1
                start = time.perf_counter()
                writer.write(requests[cursor[0]])
                status = await _read_response(reader)
                stats["latencies_ms"].append((time.perf_counter() - start) * 1000)
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            # A closed or garbled connection is counted and replaced, never fatal:
            # the measurement goes on with the remaining time.
            stats["errors"]["read"] += 1
        finally:
            writer.close()


async def _fallback_process(argv: list[str]) -> dict[str, Any]:
    from bench.events import read_request_file

    path, addrs, duration, conns, delay_ms, index, of, _out = argv
    all_requests = read_request_file(Path(path))
    mine = all_requests[int(index) :: int(of)] or all_requests
    targets = addrs.split(",")
    stats: dict[str, Any] = {
        "latencies_ms": [],
        "statuses": {},
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "wraps": 0,
    }
    cursor = [-1]
    start = time.monotonic()
    stop_at = start + float(duration)
    await asyncio.gather(
        *(
            _one_connection(
                targets[i % len(targets)], mine, cursor, stop_at, float(delay_ms), stats
            )
            for i in range(int(conns))
        )
    )
    stats["duration_s"] = time.monotonic() - start
    return stats


def main(argv: list[str]) -> int:
    """One fallback load generator process."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        stats = runner.run(_fallback_process(argv))
    Path(argv[-1]).write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
