"""A service process whose event loop blocks on request, as a wedged filter worker's does.

Run as ``python wedged_service.py <metrics bind> <trigger file>``: it serves the real
runtime's health app (``/livez``, ``/readyz``, ``/metrics``) on the bind, like every
Warden service, until the trigger file exists; then one coroutine blocks the loop (as
CPU-bound code does, review H3) without the process dying.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from warden.runtime.service import ServiceRuntime, run_async
from warden.settings import Settings


async def main(bind: str, trigger: Path) -> None:
    runtime = ServiceRuntime("wedged", Settings(shutdown_delay_seconds=0))
    runtime.add_http_server("metrics", runtime.health_app(), bind)

    async def wedge() -> None:
        while not trigger.exists():
            await asyncio.sleep(0.05)
        print("wedging the event loop", flush=True)
        time.sleep(3600)  # blocks the loop; the process stays alive

    await runtime.serve(background=[wedge])


if __name__ == "__main__":
    sys.exit(run_async(lambda: main(sys.argv[1], Path(sys.argv[2]))))
