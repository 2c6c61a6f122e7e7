"""The fault suite's checks catch what they are for: given recorded answers, stored rows
and what the homeserver and webhook target saw, each kind of broken promise (a flipped
or lost verdict, a side effect done twice or never, a 500 or a hang, a slow recovery,
no verdicts while Redis is down) is reported, and a clean run reports nothing."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.faults.faulty_answers import Exchange, FaultyAnswers
from tests.faults.load_and_faults import (
    Answer,
    Fault,
    Figures,
    Findings,
    RetryChain,
    Traffic,
    check,
)
from tests.moderator.federation_destination import Destination, Keyring
from warden.storage.migrations import migrate

ROOM = "!room"
HS = "127.0.0.1:1000"  # the sender's server
RELAY = "127.0.0.1:2000"
T0 = 1000.0


@pytest.fixture
async def pool(empty_pg_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh migrated database (the checks read every prohibited verdict)."""
    conn = await asyncpg.connect(empty_pg_database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(empty_pg_database, min_size=1, max_size=2)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


class Run:
    """A recorded run built by hand: what the traffic saw, what is stored, what the
    homeserver and the webhook target received."""

    def __init__(self) -> None:
        self.traffic = Traffic(None, [], ROOM, random.Random(0))  # type: ignore[arg-type]
        self.homeserver = FaultyAnswers(app=None)
        self.webhook = FaultyAnswers(app=None)
        self.faults: list[Fault] = []
        self.rows: list[tuple[str, int, str, str]] = []
        self.actions: list[tuple[str, str]] = []
        self.deliveries: list[tuple[str, str]] = []
        self.starts: dict[str, int] = {}
        self.bot: Destination | None = None

    def answer(self, event_id: str, outcome: str, at: float = T0, **kw: Any) -> Answer:
        verdict = {"signed": "signed:sig", "refused": "refused:{}"}.get(outcome, "")
        self.traffic.events.setdefault(event_id, ({}, None, outcome == "refused"))  # type: ignore[arg-type]
        self.traffic.created.setdefault(event_id, at)
        fields = {"kind": "sign", "gateway": "gateway-a", "status": 200, "verdict": verdict}
        fields.update(kw)
        answer = Answer(key=event_id, started=at, ended=at + 0.1, outcome=outcome, **fields)
        self.traffic.answers.append(answer)
        return answer

    def stored(self, event_id: str, cls: int, origin: str = RELAY) -> None:
        self.rows.append((event_id, cls, f"@u:{HS}", origin))

    def refused_and_handled(self, event_id: str, at: float = T0) -> None:
        """A refused event, stored, redacted once and reported once."""
        self.answer(event_id, "refused", at)
        self.stored(event_id, 2)
        self.redact(event_id, "txn-" + event_id, at + 0.5)
        self.post(event_id, at + 0.5)
        self.actions.append((event_id, "done"))
        self.deliveries.append((event_id, "delivered"))

    def redact(self, event_id: str, txn: str, at: float, mode: str = "normal") -> None:
        path = f"/_matrix/client/v3/rooms/{ROOM}/redact/{event_id}/{txn}"
        self.homeserver.exchanges.append(Exchange(at, "PUT", path, {}, mode, 200))

    def post(self, event_id: str, at: float, mode: str = "normal") -> None:
        headers = {"idempotency-key": event_id}
        self.webhook.exchanges.append(Exchange(at, "POST", "/hook", headers, mode, 200))

    async def check(self, pool: asyncpg.Pool) -> Findings:
        now = int(time.time() * 1000)
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class,"
                " sender, event_type, origin, first_seen_ts, published)"
                " VALUES ($1, $5, 'c', 'h', $2, $3, 'm.room.message', $4, 0, true)",
                [(*row, ROOM) for row in self.rows],
            )
            await conn.executemany(
                "INSERT INTO moderation_actions (event_id, room_id, action, moderator_user_id,"
                " status, updated_ts) VALUES ($1, $3, 'redact', '@mod:hs', $2, $4)",
                [(*a, ROOM, now) for a in self.actions],
            )
            await conn.executemany(
                "INSERT INTO webhook_deliveries (event_id, community_id, url_host, status,"
                " updated_ts) VALUES ($1, 'c', 'localhost', $2, $3)",
                [(*d, now) for d in self.deliveries],
            )
        return await check(
            pool, self.traffic, self.faults, self.homeserver, self.webhook, Figures(),
            self.starts, self.bot,
        )  # fmt: skip


def fault(kind: str, target: str, started: float, ended: float, recovered: float) -> Fault:
    f = Fault(kind, target, started, ended, recovered)
    if kind == "kill" and target.startswith("gateway"):
        f.unreachable_until = recovered
    if kind == "restart":
        f.down_at = started
    return f


async def test_a_clean_run_has_no_findings(pool: asyncpg.Pool) -> None:
    run = Run()
    run.answer("$ok", "signed")
    run.answer("$ok", "signed", T0 + 1, gateway="gateway-b")
    run.stored("$ok", 0, origin=HS)
    run.refused_and_handled("$bad")
    run.faults.append(fault("kill", "gateway-a", T0 + 2, T0 + 2, T0 + 5))
    run.answer("$ok", "transport", T0 + 3, status=0)  # the killed gateway: allowed
    run.answer("$later", "unavailable", T0 + 2.5, status=503)
    run.traffic.retries.append(RetryChain("$later", T0 + 2.5, T0 + 6, "signed"))
    run.answer("$later", "signed", T0 + 6)
    run.stored("$later", 0, origin=HS)
    run.starts = {"gateway-a": 2, "gateway-b": 1}  # started again after its kill
    assert (await run.check(pool)).all() == {}


async def test_a_flipped_verdict_is_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.answer("$e", "signed")
    run.answer("$e", "refused", T0 + 1)
    run.stored("$e", 0)
    run.answer("$f", "signed")
    run.stored("$f", 2)  # stored prohibited, answered with a signature
    findings = await run.check(pool)
    # $e: two answers, one disagreeing with the store, a neutral event refused; $f: store.
    assert len(findings.flipped) == 4, findings.flipped


async def test_lost_verdicts_and_side_effects_are_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.answer("$unstored", "signed")  # a signature without a verdict
    run.answer("$unredacted", "refused")
    run.stored("$unredacted", 2)
    run.post("$unredacted", T0 + 1)
    run.deliveries.append(("$unredacted", "delivered"))
    run.answer("$unreported", "refused")
    run.stored("$unreported", 2)
    run.redact("$unreported", "t1", T0 + 1)
    run.actions.append(("$unreported", "done"))
    run.answer("$stuck", "unavailable", status=503)
    run.traffic.retries.append(RetryChain("$stuck", T0))  # never answered again
    lost = (await run.check(pool)).lost
    assert [x.split(":")[0] for x in lost] == ["$unstored", "$unredacted", "$unreported", "$stuck"]


async def test_side_effects_done_twice_are_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.refused_and_handled("$two_txns")
    run.redact("$two_txns", "another-txn", T0 + 2)  # a second redaction
    run.refused_and_handled("$posted_again", T0 + 10)
    run.post("$posted_again", T0 + 12)  # after a clean answer, nobody was killed
    run.refused_and_handled("$after_kill")
    run.faults.append(fault("kill", "webhooks", T0 + 1, T0 + 1, T0 + 3))
    run.post("$after_kill", T0 + 4)  # the success died with the killed process: allowed
    run.refused_and_handled("$after_restart", T0 + 20)
    run.faults.append(fault("restart", "postgres", T0 + 20.6, T0 + 22, T0 + 23))
    run.redact("$after_restart", "txn-$after_restart", T0 + 24)  # "done" could not be stored
    run.refused_and_handled("$delayed")
    run.post("$delayed", T0 + 0.2, mode="delay")  # an answer lost: a retry is right
    duplicates = (await run.check(pool)).duplicates
    assert len(duplicates) == 3, duplicates
    assert duplicates[0].startswith("$two_txns: redacted with 2 transaction IDs")
    assert duplicates[1].startswith("$two_txns: redaction sent again")
    assert duplicates[2].startswith("$posted_again: webhook sent again")


async def test_bad_answers_are_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.stored("$e", 0)
    run.answer("$e", "signed")
    run.answer("$e", "bad", status=500, detail="500")
    run.answer("$e", "hang", status=0)
    run.answer("$e", "transport", status=0)  # no gateway was killed
    run.faults.append(fault("kill", "gateway-b", T0 + 5, T0 + 5, T0 + 8))
    run.answer("$e", "transport", T0 + 6, status=0)  # on gateway-a, not the killed one
    assert len((await run.check(pool)).bad_answers) == 4


async def test_slow_recovery_and_no_verdicts_without_redis_are_found(
    pool: asyncpg.Pool,
) -> None:
    run = Run()
    run.faults.append(fault("restart", "redis", T0, T0 + 3, T0 + 4))
    for n in range(3):
        event_id = f"$during{n}"
        run.answer(event_id, "unavailable", T0 + 1.6 + n * 0.1, status=503)
        run.traffic.retries.append(RetryChain(event_id, T0 + 1, T0 + 20, "signed"))
        run.answer(event_id, "signed", T0 + 20, kind="retry")
        run.stored(event_id, 0, origin=HS)
    run.faults.append(fault("kill", "worker-a", T0 + 30, T0 + 30, T0 + 75))  # 45 s > 30
    findings = await run.check(pool)
    assert len(findings.slow_recoveries) == 4  # three events 17 s after Redis, the worker
    assert len(findings.redis_outage) == 1


async def test_a_process_that_exited_unkilled_is_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.faults.append(fault("kill", "worker-b", T0, T0, T0 + 3))
    run.starts = {"worker-a": 2, "worker-b": 2, "moderator": 1}
    assert (await run.check(pool)).unplanned_exits == [
        "worker-a: started 2 times, killed 0 times (see its output)"
    ]


def command_txn(*event_ids: str) -> dict[str, Any]:
    """A transaction of to-device commands, as the bot's server accepted it."""
    return {
        "edus": [
            {"content": {"messages": {"@bot:b": {"*": {"command": "redact", "event_id": e}}}}}
            for e in event_ids
        ]
    }


async def test_commands_lost_or_processed_twice_are_found(pool: asyncpg.Pool) -> None:
    run = Run()
    run.bot = Destination("b", Keyring("ed25519:x", None))  # type: ignore[arg-type]
    for event_id in ("$once", "$twice", "$never"):
        run.refused_and_handled(event_id)
    run.bot.accepted = {"t1": command_txn("$once"), "t2": command_txn("$twice")}
    run.bot.accepted["t3"] = command_txn("$twice")  # another transaction, same command
    findings = await run.check(pool)
    assert findings.lost == ["$never: no command reached the bot's server"]
    assert findings.duplicates == ["$twice: 2 commands processed"]


async def test_recovery_counts_from_the_last_fault_a_retried_event_ran_into(
    pool: asyncpg.Pool,
) -> None:
    def run_with_final(final: float, event_id: str) -> Run:
        run = Run()
        run.faults.append(fault("restart", "nats", T0, T0 + 3, T0 + 4))
        run.faults.append(fault("restart", "postgres", T0 + 6, T0 + 9, T0 + 10))
        run.answer(event_id, "unavailable", T0 + 2, status=503)
        run.traffic.retries.append(RetryChain(event_id, T0 + 2, final, "signed"))
        run.answer(event_id, "signed", final - 0.1, kind="retry")
        run.stored(event_id, 0, origin=HS)
        return run

    # 13 s after NATS was back, but 7 s after PostgreSQL was: within the bound.
    assert (await run_with_final(T0 + 16, "$in_time").check(pool)).slow_recoveries == []
    slow = (await run_with_final(T0 + 20, "$late").check(pool)).slow_recoveries  # 11 s
    assert len(slow) == 1 and "the faults up to restart postgres" in slow[0]
