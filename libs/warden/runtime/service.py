"""The life of a service process: start, serve, and drain on SIGTERM.

Shutdown order, so that Kubernetes stops routing before anything is cut:
1. SIGTERM (or SIGINT) arrives: ``/readyz`` turns 503 at once.
2. Wait ``PS_SHUTDOWN_DELAY_SECONDS`` for load balancers to notice.
3. HTTP servers stop accepting and finish in-flight requests.
4. Shutdown hooks run in reverse order of registration (drain NATS, close pools),
   bounded by ``PS_SHUTDOWN_TIMEOUT_SECONDS`` in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from warden.policyserv_settings import warn_ignored_settings
from warden.runtime import kernel_refusal
from warden.runtime.client_penalties import ClientPenalties
from warden.runtime.health import Health
from warden.runtime.http_limits import HttpLimits, protocol_class, sweep_deadlines
from warden.runtime.kernel_refusal import KernelRefusal
from warden.settings import Settings, parse_bind
from warden.telemetry.logs import configure_logging
from warden.telemetry.metrics import BUILD_INFO, WARDEN_VERSION
from warden.telemetry.runtime_metrics import measure_loop_lag
from warden.telemetry.tracing import configure_tracing

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[object]]


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the service runtime."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class _HttpServer:
    name: str
    server: _EmbeddedServer
    limits: HttpLimits
    task: asyncio.Task[None] | None = None
    sweeper: asyncio.Task[None] | None = None
    kernel_refusal: KernelRefusal | None = None


class ServiceRuntime:
    """Owns a service's HTTP servers, health state and shutdown sequence."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.health = Health(name)
        self.stopping = asyncio.Event()
        self._servers: list[_HttpServer] = []
        self._hooks: list[tuple[str, Hook]] = []
        # Set by ``bootstrap`` (a process of its own): ``freeze_startup_objects`` once
        # serving. Off for runtimes embedded in another program (tests).
        self.freeze_startup_objects = False

    def add_shutdown_hook(self, name: str, hook: Hook) -> None:
        """Run ``hook`` while stopping, after HTTP servers; hooks run last-added first."""
        self._hooks.append((name, hook))

    def add_http_server(
        self,
        name: str,
        app: ASGIApp,
        bind: str,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        penalties: ClientPenalties | None = None,
    ) -> None:
        """Serve ``app`` on ``bind`` (``host:port``) for the life of the service.

        ``penalties``: addresses the listener refuses as their connections open (the
        gateway's federation listener)."""
        host, port = parse_bind(bind)
        limits = dataclasses.replace(HttpLimits.from_settings(self.settings), penalties=penalties)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            server_header=False,
            # One write per response (http_writes.py), and the front's bounds on URL,
            # headers, read deadlines, concurrency and connections (http_limits.py).
            http=protocol_class(limits),
            ws="none",  # no service speaks WebSocket; an Upgrade is served as plain HTTP
            timeout_keep_alive=int(max(1.0, self.settings.http_keep_alive_seconds)),
            timeout_graceful_shutdown=max(1, int(self.settings.shutdown_timeout_seconds)),
        )
        self._servers.append(_HttpServer(name, _EmbeddedServer(config), limits))

    def health_app(self) -> Starlette:
        """A small app with ``/livez``, ``/readyz`` and ``/metrics``."""
        return Starlette(routes=self.health.routes())

    def request_stop(self) -> None:
        """Begin the shutdown sequence (what SIGTERM does)."""
        if not self.stopping.is_set():
            logger.info("stop requested; readiness now 503", extra={"event": "stopping"})
            self.health.draining = True
            self.stopping.set()

    async def serve(self, background: list[Hook] | None = None) -> None:
        """Start HTTP servers and background tasks; return after a clean drain.

        ``background`` coroutines run until stop; a background task that crashes stops
        the service (a supervisor or Kubernetes restarts it) rather than limping on.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        BUILD_INFO.labels(self.name, WARDEN_VERSION).set(1)

        for s in self._servers:
            s.task = asyncio.create_task(s.server.serve(), name=f"http-{s.name}")
        bg_tasks = [asyncio.create_task(self._guard(fn)) for fn in (background or [])]
        bg_tasks.append(asyncio.create_task(measure_loop_lag(), name="loop-lag"))

        await self._wait_started()
        for s in self._servers:
            s.sweeper = asyncio.create_task(
                sweep_deadlines(s.server.server_state, s.limits, s.name), name=f"sweep-{s.name}"
            )
            penalties = s.limits.penalties
            if (
                penalties is not None
                and self.settings.http_auth_failure_kernel_drop
                and kernel_refusal.supported()
            ):
                listeners = [sock for server in s.server.servers for sock in server.sockets]
                s.kernel_refusal = KernelRefusal(penalties, listeners)
            logger.info(
                "listening",
                extra={"server": s.name, "bind": f"{s.server.config.host}:{s.server.config.port}"},
            )
        if self.freeze_startup_objects:
            freeze_startup_objects()
        stop_waiter = asyncio.create_task(self.stopping.wait())
        server_tasks = [s.task for s in self._servers if s.task is not None]
        done, _ = await asyncio.wait(
            [stop_waiter, *server_tasks], return_when=asyncio.FIRST_COMPLETED
        )
        if stop_waiter not in done:
            # An HTTP server ended by itself (e.g. the port was taken): stop everything.
            logger.error("an HTTP server stopped unexpectedly", extra={"event": "server_exit"})
            self.request_stop()
        await self._drain(bg_tasks)

    async def _guard(self, fn: Hook) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background task failed; stopping", extra={"event": "task_failed"})
            self.request_stop()

    async def _wait_started(self) -> None:
        for s in self._servers:
            while not s.server.started:
                if s.task is not None and s.task.done():
                    exc = s.task.exception()
                    raise RuntimeError(f"HTTP server {s.name} failed to start") from exc
                await asyncio.sleep(0.02)

    async def _drain(self, bg_tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        for s in self._servers:
            if s.kernel_refusal is not None:
                s.kernel_refusal.close()
            s.server.should_exit = True
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                await asyncio.gather(
                    *(s.task for s in self._servers if s.task), return_exceptions=True
                )
                for s in self._servers:
                    if s.sweeper is not None:
                        s.sweeper.cancel()
                for t in bg_tasks:
                    t.cancel()
                await asyncio.gather(*bg_tasks, return_exceptions=True)
                for name, hook in reversed(self._hooks):
                    try:
                        await hook()
                    except Exception:
                        logger.exception("shutdown hook failed", extra={"hook": name})
        except TimeoutError:
            logger.error("drain timed out; exiting anyway", extra={"event": "drain_timeout"})
        logger.info("stopped", extra={"event": "stopped"})


_frozen = False

# Net new container objects (allocations minus frees) that start a young collection;
# CPython's default is 700. A request's objects die by reference counting, so what the
# count measures is the slow growth of caches (verdicts, checked events, keys), and at
# 700 the collector ran about 60 times a second under load, scanning and promoting the
# objects of the requests in flight: 4-5% of the gateway's CPU and 2-3% of a worker's
# (``make bench``, unique events, measured with ``gc.callbacks``). At 20,000 it runs a
# few times a minute (a collection of the young generation then takes about 10 ms) and
# cycles are still found: garbage waits for at most 20,000 objects more.
GC_YOUNG_THRESHOLD = 20_000


def freeze_startup_objects() -> None:
    """Move every object made so far out of the garbage collector's sight (once), and
    collect the young generation less often (``GC_YOUNG_THRESHOLD``).

    What a service builds before it serves (modules, apps, clients, registries) lives as
    long as the process, yet each full collection would scan it again: with the gateway
    under load, full collections that found nothing to free took 50-170 ms each (measured
    with ``make bench``), stalling every request in flight. Start-up garbage is collected
    first, so nothing collectable is frozen.
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def bootstrap(name: str, settings: Settings) -> ServiceRuntime:
    """Configure logs and tracing for a service process and create its runtime."""
    configure_logging(name, settings.log_level, log_content=settings.log_content)
    try:
        configure_tracing(name, settings.otel_exporter, settings.otel_sample_ratio)
    except ValueError as exc:  # OTEL_TRACES_SAMPLER or its argument: one clear line
        logger.error(f"tracing: {exc}", extra={"event": "startup_failed"})
        raise SystemExit(1) from None
    # policyserv variables an operator kept from policyserv that Warden does not use.
    warn_ignored_settings()
    runtime = ServiceRuntime(name, settings)
    runtime.freeze_startup_objects = True  # a service process of its own
    return runtime


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run a service's main coroutine on uvloop; turn start-up failures into exit code 1.

    Failures a service can name (a dependency that never answered, a bad key file) are
    logged as one line; anything else is logged with its traceback.
    """
    import uvloop

    from warden.matrix.keys import KeyFileError
    from warden.runtime.dependencies import DependencyUnavailable

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except (DependencyUnavailable, KeyFileError) as exc:
        logger.error(str(exc), extra={"event": "startup_failed"})
        return 1
    except Exception:
        logger.exception("service crashed", extra={"event": "crashed"})
        return 1
    return 0
