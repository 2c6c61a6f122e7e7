"""JetStream streams keep what an operator set (operations review, gap 1).

A service start used to call ``update_stream`` with Warden's whole configuration, which
scaled an operator's R3 verdict stream back to R1 and reset raised size bounds. Now
Warden sets only what it owns (subjects, retention, discard, duplicate window); the
replica count and the bounds are applied only when a ``PS_JETSTREAM_*`` setting gives
them. The replica tests run a real three-node NATS cluster on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, StorageType
from pydantic import ValidationError

from warden.bus.consumer import ensure_durable_consumer
from warden.bus.streams import (
    StreamLimits,
    StreamSettings,
    VerdictStreams,
    durable_consumer_config,
    ensure_inbound_stream,
    ensure_verdicts_stream,
    inbound_stream_config,
)
from warden.dev.embedded import nats_server_binary
from warden.dev.procs import free_port
from warden.settings import Settings


@pytest.fixture
async def names(nats_client: NATS) -> AsyncIterator[VerdictStreams]:
    tag = uuid.uuid4().hex[:10]
    streams = VerdictStreams(
        actionable=f"TEST_LIM_ACT_{tag}",
        log=f"TEST_LIM_LOG_{tag}",
        subject_prefix=f"lim{tag}.verdict.",
        moderation_subject=f"lim{tag}.moderate",
        max_bytes=16 * 1024 * 1024,
        log_max_bytes=8 * 1024 * 1024,
    )
    yield streams
    js = nats_client.jetstream()
    for name in (streams.actionable, streams.log):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)


async def test_a_start_keeps_bounds_an_operator_raised(
    nats_client: NATS, names: VerdictStreams, caplog: pytest.LogCaptureFixture
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js, names)
    info = await js.stream_info(names.actionable)
    # The operator raises the bounds with `nats stream edit` ...
    await js.update_stream(
        dataclasses.replace(info.config, max_bytes=64 * 1024 * 1024, max_age=30 * 86400.0)
    )
    # ... and a service restarts with no PS_JETSTREAM_* setting.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="warden.bus.streams"):
        await ensure_verdicts_stream(js, names)
    after = (await js.stream_info(names.actionable)).config
    assert after.max_bytes == 64 * 1024 * 1024
    assert after.max_age == pytest.approx(30 * 86400.0)
    # The log says what was left alone, and that nothing was updated.
    (record,) = [
        r
        for r in caplog.records
        if r.getMessage() == "JetStream stream keeps limits set outside Warden"
        and getattr(r, "stream", None) == names.actionable
    ]
    assert record.kept == {"max_bytes": 64 * 1024 * 1024, "max_age": 30 * 86400.0}
    assert not [r for r in caplog.records if r.getMessage() == "updated JetStream stream"]


async def test_a_start_restores_what_warden_owns(
    nats_client: NATS, names: VerdictStreams, caplog: pytest.LogCaptureFixture
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js, names)
    info = await js.stream_info(names.actionable)
    await js.update_stream(dataclasses.replace(info.config, discard=DiscardPolicy.OLD))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="warden.bus.streams"):
        await ensure_verdicts_stream(js, names)
    (updated,) = [
        r
        for r in caplog.records
        if r.getMessage() == "updated JetStream stream"
        and getattr(r, "stream", None) == names.actionable
    ]
    assert set(updated.changed) == {"discard"}
    # A full refusal stream must refuse new messages, never evict unprocessed ones.
    assert (await js.stream_info(names.actionable)).config.discard == DiscardPolicy.NEW


async def test_settings_are_applied_to_an_existing_stream(
    nats_client: NATS, names: VerdictStreams
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js, names)
    settings = Settings(
        jetstream_verdicts_max_bytes=32 * 1024 * 1024,
        jetstream_verdict_log_max_age_seconds=3600,
    )
    await ensure_verdicts_stream(js, names, StreamSettings.from_settings(settings))
    assert (await js.stream_info(names.actionable)).config.max_bytes == 32 * 1024 * 1024
    assert (await js.stream_info(names.log)).config.max_age == pytest.approx(3600.0)


async def test_memory_storage_for_a_new_stream(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    name = f"TEST_LIM_IN_{uuid.uuid4().hex[:10]}"
    config = inbound_stream_config(name=name, subjects=[f"{name.lower()}.>"], max_bytes=1 << 20)
    settings = StreamSettings.from_settings(Settings(jetstream_storage="memory"))
    try:
        await ensure_inbound_stream(js, settings, config)
        assert (await js.stream_info(name)).config.storage == StorageType.MEMORY
    finally:
        await js.delete_stream(name)


def test_settings_reject_impossible_replicas() -> None:
    with pytest.raises(ValidationError, match="jetstream_replicas"):
        Settings(jetstream_replicas=0)
    assert StreamSettings.from_settings(Settings()).verdicts == StreamLimits()


# --- a real three-node cluster ---


def _wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nats-server did not start") from None
            time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """Three JetStream nodes clustered on loopback; yields a URL naming all three."""
    client_ports = [free_port() for _ in range(3)]
    route_ports = [free_port() for _ in range(3)]
    routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    procs = []
    try:
        for i in range(3):
            store = tmp_path / f"n{i}"
            conf = tmp_path / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{client_ports[i]}\n"
                f'jetstream {{ store_dir: "{store}" }}\n'
                f"cluster {{ name: wardentest, listen: 127.0.0.1:{route_ports[i]},"
                f" routes: [{routes}] }}\n"
            )
            procs.append(
                subprocess.Popen(
                    [str(nats_server_binary()), "-c", str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 15
        for port, proc in zip(client_ports, procs, strict=True):
            _wait_port(port, proc, deadline)
        yield ",".join(f"nats://127.0.0.1:{p}" for p in client_ports)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


async def _connect_when_meta_leader(url: str) -> NATS:
    """Connect and wait until the cluster has elected a JetStream meta leader."""
    nc = await nats.connect(url.split(","), connect_timeout=5)
    deadline = time.monotonic() + 20
    while True:
        try:
            await nc.jetstream().account_info()
            return nc
        except Exception:
            if time.monotonic() > deadline:
                await nc.close()
                raise
            await asyncio.sleep(0.2)


async def test_a_start_never_scales_an_r3_stream_back_to_r1(cluster: str) -> None:
    """The review's reproduction: an operator's R3 verdict stream survives a restart."""
    nc = await _connect_when_meta_leader(cluster)
    try:
        js = nc.jetstream()
        r3 = StreamSettings.from_settings(Settings(jetstream_replicas=3))
        deadline = time.monotonic() + 20
        while True:  # peers may still be joining the meta group
            try:
                await ensure_verdicts_stream(js, limits=r3)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert (await js.stream_info("WARDEN_VERDICTS")).config.num_replicas == 3
        assert (await js.stream_info("WARDEN_VERDICT_LOG")).config.num_replicas == 3
        # A service of an older deployment, or one without the setting, starts.
        await ensure_verdicts_stream(js)
        info = await js.stream_info("WARDEN_VERDICTS")
        assert info.config.num_replicas == 3
        assert (await js.stream_info("WARDEN_VERDICT_LOG")).config.num_replicas == 3
        # The durable consumers (moderator, webhooks) follow the stream: three copies.
        assert info.config.subjects
        consumer = await ensure_durable_consumer(
            js,
            "WARDEN_VERDICTS",
            durable_consumer_config("warden-test-r3", info.config.subjects[0], 30, 10),
        )
        assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2
    finally:
        await nc.close()
