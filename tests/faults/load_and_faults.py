"""The fault suite's moving parts: the traffic, the faults, and the checks afterwards.

* ``Traffic`` plays several origin homeservers against the two gateways: new neutral
  events asked for by their sender's server, repeats of earlier events by other
  servers, events carrying the community's keyword (refused) asked for by relaying
  servers only (so the moderator redacts them), and ``/send`` transactions, some of
  them retried. Every answer is recorded with its timing. A request whose gateway is
  unreachable is retried once on the other gateway, as a load balancer would.
* ``Faults`` injects one fault at a time, at random moments, and measures how long the
  stack takes to answer ``/sign`` through both gateways and be ready again afterwards.
* ``check`` compares what was answered, what is stored and what the homeserver and
  the webhook target saw, and ``Figures`` holds the counts printed as the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import asyncpg
import httpx
import orjson

from tests.faults.fault_stack import SERVICES, FaultStack
from tests.faults.faulty_answers import FaultyAnswers
from tests.faults.private_servers import PrivateServers, pause, resume
from tests.gateway.policy_harness import GATEWAY_NAME, SIGN_PATH, Origin
from tests.moderator.federation_destination import Destination
from warden.federation.xmatrix import sign_request
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.ids import server_name_of
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version

ROOM_VERSION = "12"
KEYWORD = "buy-now"
# How long a homeserver waits for /sign (Synapse's policy server client gives up
# sooner; the gateway's verdict timeout, 10 s, is below this): longer is a hang.
HOMESERVER_TIMEOUT = 15.0
# Review M6: with Redis down, /sign keeps answering (slower). Services notice the outage
# on their first failed command and then skip Redis for a while; new events asked this
# long after Redis went down must all get verdicts.
REDIS_GRACE = 1.5
# How long a homeserver keeps asking again after a 503 before the suite calls the
# event lost (far past every recovery bound: the check reports the overrun).
RETRY_FOR = 90.0
# Recovery bounds, from the end of a fault (process killed, server back, worker
# resumed, misbehaving party normal again) until /sign answers through both gateways
# and every service is ready. A killed process must also start again (a Python
# service needs a few seconds on a busy 2-core machine).
RECOVERY_BOUND = {"kill": 30.0, "pause": 10.0, "restart": 10.0, "delay": 10.0, "drop": 10.0}


@dataclass
class Answer:
    """One request and what came back."""

    kind: str  # "sign", "send" or "probe"
    key: str  # the event ID (sign, probe) or the transaction ID (send)
    gateway: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer
    outcome: str  # signed, refused, unavailable, rate_limited, transport, hang, bad
    verdict: str = ""  # signature or refusal, to compare answers for one event
    detail: str = ""
    retry_after: float = 0.0  # seconds, of a 503


@dataclass
class RetryChain:
    """A /sign answered 503 and asked again, as a homeserver does, until final."""

    event_id: str
    first_unavailable: float
    final: float = 0.0  # 0: never answered with a verdict within ``RETRY_FOR``
    outcome: str = ""


def classify(kind: str, response: httpx.Response) -> tuple[str, str, str]:
    """(outcome, verdict, detail) of one HTTP answer."""
    status = response.status_code
    if status == 503:
        if response.headers.get("retry-after", "").strip().isdigit():
            return "unavailable", "", response.text[:120]
        return "bad", "", f"503 without Retry-After: {response.text[:200]}"
    if kind == "send":
        if status == 200:
            return "accepted", "", ""
        return "bad", "", f"{status}: {response.text[:200]}"
    if status == 200:
        signature = response.json().get(GATEWAY_NAME, {}).get(POLICY_SERVER_KEY_ID)
        if not signature:
            return "bad", "", f"200 without a signature: {response.text[:200]}"
        return "signed", f"signed:{signature}", ""
    if status == 400 and response.json().get("errcode") == "M_FORBIDDEN":
        return (
            "refused",
            "refused:" + orjson.dumps(response.json(), option=orjson.OPT_SORT_KEYS).decode(),
            "",
        )
    return "bad", "", f"{status}: {response.text[:200]}"


@dataclass
class Traffic:
    """Steady /sign and /send traffic from ``origins`` to the stack's gateways."""

    stack: FaultStack
    origins: Sequence[Origin]
    room_id: str
    rng: random.Random
    rate: float = 20.0  # requests per second
    answers: list[Answer] = field(default_factory=list)
    # event ID -> (event, sender's origin, refused expected)
    events: dict[str, tuple[dict[str, Any], Origin, bool]] = field(default_factory=dict)
    sent_txns: list[tuple[Origin, str, dict[str, Any]]] = field(default_factory=list)
    retries: list[RetryChain] = field(default_factory=list)
    created: dict[str, float] = field(default_factory=dict)  # event ID -> first asked
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _counter: int = 0

    def new_event(self, *, refused: bool) -> tuple[str, dict[str, Any], Origin]:
        """A fresh event by a user of a random origin; keyword events by one-off users."""
        self._counter += 1
        sender_origin = self.rng.choice(self.origins)
        if refused:
            localpart, body = f"spammer{self._counter}", f"please {KEYWORD} #{uuid.uuid4().hex}"
        else:
            localpart = f"user{self.rng.randrange(20)}"
            body = f"hello {self._counter} {uuid.uuid4().hex}"
        event = sender_origin.event(
            self.room_id, ROOM_VERSION, body=body, sender=f"@{localpart}:{sender_origin.name}"
        )
        event_id = str(compute_event_id(get_room_version(ROOM_VERSION), event))
        self.events[event_id] = (event, sender_origin, refused)
        self.created[event_id] = time.monotonic()
        return event_id, event, sender_origin

    def asker_for(self, event_id: str) -> Origin:
        """Who asks again: any origin for a neutral event; for a refused one, only
        servers that are not the sender's (the sender's own server would not relay it)."""
        _, sender_origin, refused = self.events[event_id]
        choices = [o for o in self.origins if not (refused and o is sender_origin)]
        return self.rng.choice(choices)

    async def sign(
        self, client: httpx.AsyncClient, event_id: str, asker: Origin, kind: str = "sign",
        gateway: str | None = None,
    ) -> Answer:  # fmt: skip
        """Ask for a signature; on a dead gateway, once more on the other one."""
        event = self.events[event_id][0]
        gateways = list(self.stack.api_urls)
        first = gateway or self.rng.choice(gateways)
        order = [first] + ([g for g in gateways if g != first] if gateway is None else [])
        body = encode_canonical_json(event)
        answer = None
        for name in order:
            answer = await self._request(
                client, kind, event_id, name, "POST", SIGN_PATH, body,
                asker.auth(SIGN_PATH, event),
            )  # fmt: skip
            if answer.outcome != "transport":
                break
        assert answer is not None
        return answer

    async def send(self, client: httpx.AsyncClient, asker: Origin, txn_id: str,
                   txn: dict[str, Any]) -> Answer:  # fmt: skip
        """PUT a /send transaction; on a dead gateway, once more on the other one."""
        uri = f"/_matrix/federation/v1/send/{txn_id}"
        auth = sign_request(asker.name, GATEWAY_NAME, "PUT", uri, txn, asker.key)
        gateways = list(self.stack.api_urls)
        self.rng.shuffle(gateways)
        answer = None
        for name in gateways:
            answer = await self._request(
                client, "send", txn_id, name, "PUT", uri, encode_canonical_json(txn), auth
            )
            if answer.outcome != "transport":
                break
        assert answer is not None
        return answer

    async def _request(
        self, client: httpx.AsyncClient, kind: str, key: str, gateway: str, method: str,
        path: str, body: bytes, auth: str,
    ) -> Answer:  # fmt: skip
        started = time.monotonic()
        url = f"{self.stack.api_urls[gateway]}{path}"
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        try:
            response = await client.request(
                method, url, content=body, headers=headers, timeout=HOMESERVER_TIMEOUT
            )
        except httpx.TimeoutException as exc:
            outcome, verdict, detail, status = "hang", "", repr(exc), 0
        except httpx.TransportError as exc:
            outcome, verdict, detail, status = "transport", "", repr(exc), 0
        else:
            status = response.status_code
            outcome, verdict, detail = classify(kind, response)
        answer = Answer(
            kind, key, gateway, started, time.monotonic(), status, outcome, verdict, detail
        )
        if outcome == "unavailable":
            answer.retry_after = float(response.headers["retry-after"])
        self.answers.append(answer)
        return answer

    async def _one(self, client: httpx.AsyncClient) -> None:
        roll = self.rng.random()
        known = list(self.events)
        if roll < 0.1:
            if self.sent_txns and self.rng.random() < 0.3:  # a retried transaction
                origin, txn_id, txn = self.rng.choice(self.sent_txns)
            else:
                origin = self.rng.choice(self.origins)
                pdus = [
                    origin.event(self.room_id, ROOM_VERSION, body=f"via send {uuid.uuid4().hex}",
                                 sender=f"@user{self.rng.randrange(20)}:{origin.name}")
                    for _ in range(self.rng.randint(1, 3))
                ]  # fmt: skip
                txn_id = f"t{uuid.uuid4().hex}"
                txn = {"origin": origin.name, "origin_server_ts": int(time.time() * 1000),
                       "pdus": pdus}  # fmt: skip
                self.sent_txns.append((origin, txn_id, txn))
            await self.send(client, origin, txn_id, txn)
        elif roll < 0.25:
            event_id, _, sender_origin = self.new_event(refused=True)
            await self.sign_until_final(client, event_id, self.asker_for(event_id))
        elif roll < 0.65 or not known:
            event_id, _, sender_origin = self.new_event(refused=False)
            await self.sign_until_final(client, event_id, sender_origin)
        else:
            event_id = self.rng.choice(known)
            await self.sign_until_final(client, event_id, self.asker_for(event_id))

    async def sign_until_final(
        self, client: httpx.AsyncClient, event_id: str, asker: Origin
    ) -> None:
        """Ask; after a 503, ask again after its Retry-After (at most 2 s: the suite
        measures recovery) until a signature or refusal, as a homeserver does. The
        retries run outside the traffic's slots, so an outage does not stall it."""
        answer = await self.sign(client, event_id, asker)
        if answer.outcome != "unavailable":
            return
        chain = RetryChain(event_id, answer.started)
        self.retries.append(chain)

        async def retry() -> None:
            latest = answer
            while time.monotonic() < chain.first_unavailable + RETRY_FOR:
                await asyncio.sleep(min(max(latest.retry_after, 0.2), 2.0))
                latest = await self.sign(client, event_id, asker, kind="retry")
                if latest.outcome in ("signed", "refused"):
                    chain.final, chain.outcome = latest.ended, latest.outcome
                    return

        task = asyncio.create_task(retry())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Send at ``rate`` until ``stop``; at most 64 requests in flight."""
        slots = asyncio.Semaphore(64)
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=40)
        async with httpx.AsyncClient(limits=limits) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                await slots.acquire()

                async def one() -> None:
                    try:
                        await self._one(client)
                    finally:
                        slots.release()

                task = asyncio.create_task(one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                next_at += 1 / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            while self._tasks:  # requests in flight, and their retries
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stop(self) -> None:
        """Stop sending (``run`` returns once the requests in flight are answered)."""
        self._stop.set()


@dataclass
class Fault:
    """One injected fault and what followed."""

    kind: str  # kill, pause, restart, delay, drop
    target: str  # a child, a server, or "homeserver"/"webhook"
    started: float = 0.0
    ended: float = 0.0  # the fault is over (process killed, server back, ...)
    recovered: float = 0.0  # /sign answers through both gateways, all ready
    # A killed gateway: until when requests to it may fail to connect.
    unreachable_until: float = 0.0
    down_at: float = 0.0  # a restarted server: when it stopped

    @property
    def name(self) -> str:
        return f"{self.kind} {self.target}"

    @property
    def recovery_seconds(self) -> float:
        return max(0.0, self.recovered - self.ended)


def fault_plan(rng: random.Random, rounds: int) -> list[Fault]:
    """Every kind of fault on every target, ``rounds`` times, in random order."""
    one_round = [Fault("kill", name) for name in SERVICES]
    one_round += [Fault("pause", rng.choice(("worker-a", "worker-b")))]
    one_round += [Fault("restart", kind) for kind in ("nats", "redis", "postgres")]
    one_round += [
        Fault(mode, party) for mode in ("delay", "drop") for party in ("homeserver", "webhook")
    ]
    plan: list[Fault] = []
    for _ in range(rounds):
        batch = [Fault(f.kind, f.target) for f in one_round]
        rng.shuffle(batch)
        plan += batch
    return plan


@dataclass
class Faults:
    """Injects the plan's faults one at a time and measures recovery."""

    stack: FaultStack
    servers: PrivateServers
    traffic: Traffic
    # "homeserver" (its client API and its federation API), "webhook"
    parties: dict[str, list[FaultyAnswers]]
    rng: random.Random
    claim_ttl: float
    window_seconds: float = 5.0  # how long a misbehaving party misbehaves
    server_down_seconds: float = 3.0
    log: Callable[[str], None] = print
    done: list[Fault] = field(default_factory=list)

    async def run(self, plan: Sequence[Fault]) -> None:
        """Each fault at a random moment (1 to 3 s after the previous recovered)."""
        for fault in plan:
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            await self.inject(fault)
            self.done.append(fault)

    async def inject(self, fault: Fault) -> None:
        """Inject ``fault`` and wait until the stack has recovered from it."""
        fault.started = time.monotonic()
        if fault.kind == "kill":
            pid = await self._wait_pid(fault.target)
            os.kill(pid, signal.SIGKILL)
            fault.ended = time.monotonic()
        elif fault.kind == "pause":
            pid = await self._wait_pid(fault.target)
            pause(pid)
            try:
                # Longer than a claim lives: its evaluations' claims expire meanwhile.
                await asyncio.sleep(self.claim_ttl + 3.0)
            finally:
                resume(pid)
            fault.ended = time.monotonic()
        elif fault.kind == "restart":
            fault.down_at, fault.ended = await self.servers.restart(
                fault.target, self.server_down_seconds
            )
        else:
            for party in self.parties[fault.target]:
                party.mode = fault.kind
            await asyncio.sleep(self.window_seconds)
            for party in self.parties[fault.target]:
                party.mode = "normal"
            fault.ended = time.monotonic()
        fault.recovered = await self._recovered(fault)
        if fault.kind == "kill" and fault.target.startswith("gateway"):
            fault.unreachable_until = fault.recovered
        self.log(f"fault {fault.name}: recovered in {fault.recovery_seconds:.1f}s")

    async def _wait_pid(self, name: str) -> int:
        for _ in range(600):
            pid = self.stack.pid(name)
            if pid is not None:
                return pid
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name} has no process")

    async def _recovered(self, fault: Fault) -> float:
        """When every child is ready and a new event is signed through each gateway
        (gives up after twice the bound, so the check reports the overrun)."""
        limit = fault.ended + 2 * RECOVERY_BOUND[fault.kind] + 30
        async with httpx.AsyncClient() as client:
            while time.monotonic() < limit:
                statuses = await self.stack.ready(client)
                if all(code == 200 for code in statuses.values()):
                    ok = True
                    for gateway in self.stack.api_urls:
                        event_id, _, origin = self.traffic.new_event(refused=False)
                        answer = await self.traffic.sign(
                            client, event_id, origin, kind="probe", gateway=gateway
                        )
                        ok = ok and answer.outcome == "signed"
                    if ok:
                        return time.monotonic()
                await asyncio.sleep(0.2)
        return time.monotonic()


@dataclass
class Figures:
    """What the run did and found (the README's table)."""

    seed: int = 0
    duration_seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    during_faults: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    verdicts_checked: int = 0
    prohibited_checked: int = 0
    redactions: int = 0
    webhook_deliveries: int = 0
    commands: int = 0
    duplicates: int = 0
    lost: int = 0
    flipped: int = 0
    bad_answers: int = 0
    slow_recoveries: int = 0
    unplanned_exits: int = 0
    retried: int = 0  # /sign answered 503 then asked again until final
    longest_retry: float = 0.0  # seconds from a fault's end to the last such answer
    redis_outage_asked: int = 0  # new events asked about while Redis was down
    redis_outage_answered: int = 0  # ... and given a verdict meanwhile

    def table(self) -> str:
        """The figures as a Markdown table."""
        rows = [("Seed / duration", f"{self.seed} / {self.duration_seconds:.0f} s")]
        rows.append(
            ("Faults injected", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        )
        rows.append(
            ("Requests sent", ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items())))
        )
        rows.append(
            (
                "Answers during faults",
                ", ".join(f"{k} {v}" for k, v in sorted(self.during_faults.items())),
            )
        )
        for kind, times in sorted(self.recovery.items()):
            rows.append(
                (f"Recovery after {kind} (bound {RECOVERY_BOUND[kind.split()[0]]:.0f} s)",
                 f"max {max(times):.1f} s, median {sorted(times)[len(times) // 2]:.1f} s ({len(times)} times)")  # noqa: E501
            )  # fmt: skip
        rows += [
            (
                "Verdicts checked (prohibited)",
                f"{self.verdicts_checked} ({self.prohibited_checked})",
            ),
            (
                "Redactions / webhook deliveries / bot commands",
                f"{self.redactions} / {self.webhook_deliveries} / {self.commands}",
            ),
            (
                "503s asked again until final (longest wait after the fault)",
                f"{self.retried} ({self.longest_retry:.1f} s)",
            ),
            (
                "New events given a verdict while Redis was down",
                f"{self.redis_outage_answered} of {self.redis_outage_asked}",
            ),
            ("Duplicates", str(self.duplicates)),
            ("Lost", str(self.lost)),
            ("Flipped", str(self.flipped)),
            ("Bad answers (500, hang, 503 without Retry-After)", str(self.bad_answers)),
            ("Recoveries over the bound", str(self.slow_recoveries)),
            ("Processes that exited unkilled", str(self.unplanned_exits)),
        ]
        lines = ["| Figure | Value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


@dataclass
class Findings:
    """Violations by check; empty lists mean the promise held."""

    bad_answers: list[str] = field(default_factory=list)
    flipped: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    slow_recoveries: list[str] = field(default_factory=list)
    # M6 of the review: with Redis down, /sign must keep giving verdicts (slower).
    redis_outage: list[str] = field(default_factory=list)
    # A process that exited by itself (not killed by the suite): the supervisor started
    # it again, but in production that is a crash.
    unplanned_exits: list[str] = field(default_factory=list)

    def all(self) -> dict[str, list[str]]:
        return {k: v for k, v in vars(self).items() if v}


def _fault_at(faults: Sequence[Fault], moment: float) -> Fault | None:
    """The fault whose window (injected to recovered) holds ``moment``."""
    for fault in faults:
        if fault.started <= moment <= fault.recovered:
            return fault
    return None


def _in_window(answer: Answer, faults: Sequence[Fault]) -> bool:
    return any(f.started <= answer.started <= f.recovered for f in faults)


def _unreachable_allowed(answer: Answer, faults: Sequence[Fault]) -> bool:
    """A gateway that was killed may fail to connect until it is back."""
    return any(
        f.kind == "kill" and f.target == answer.gateway
        and f.started - 1.0 <= answer.ended and answer.started <= f.unreachable_until + 1.0
        for f in faults
    )  # fmt: skip


def _exchange_event(path: str) -> tuple[str, str] | None:
    """(event ID, txn ID) of a redact request path."""
    parts = path.split("?")[0].split("/")
    if len(parts) == 9 and parts[4] == "rooms" and parts[6] == "redact":
        return unquote(parts[7]), unquote(parts[8])
    return None


def _could_not_record(faults: Sequence[Fault], service: str, start: float, end: float) -> bool:
    """Whether ``service`` may have lost a success between ``start`` and ``end``: it was
    killed, or PostgreSQL (where it records the success) or NATS (where it acknowledges
    the message) was restarted meanwhile. It then sends again with the same transaction
    ID or idempotency key, which the receiver honours: at least once, done once."""
    return any(
        (f.kind == "kill" and f.target == service and start <= f.ended <= end)
        or (f.kind == "restart" and f.target in ("postgres", "nats")
            and f.started <= end and start <= f.ended)
        for f in faults
    )  # fmt: skip


async def settle(pool: asyncpg.Pool, timeout: float) -> None:
    """Wait until every prohibited verdict's redaction and moderation command (where due)
    and webhook are done and the command queue is empty (or ``timeout`` passes: the
    checks then report what is not).

    A command is waited for by its verdict, not only by the queue: a moderator killed
    after redacting but before queueing the command leaves the queue empty, and the
    verdict's message comes back only after the consumer's ``ack_wait`` (30 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = await pool.fetchval(
            """
            SELECT count(*) FROM verdicts v
            LEFT JOIN moderation_actions m ON m.event_id = v.event_id
            LEFT JOIN webhook_deliveries w ON w.event_id = v.event_id
            WHERE v.class = 2 AND (w.status IS DISTINCT FROM 'delivered'
                  OR (m.status IS DISTINCT FROM 'done'
                      AND substr(v.sender, strpos(v.sender, ':') + 1) <> v.origin))
            """
        )
        pending += await pool.fetchval("SELECT count(*) FROM moderation_command_edus")
        pending += await pool.fetchval(
            """
            SELECT count(*) FROM verdicts v
            WHERE v.class = 2
              AND substr(v.sender, strpos(v.sender, ':') + 1) <> v.origin
              AND NOT EXISTS (
                  SELECT 1 FROM moderation_commands_sent c WHERE c.event_id = v.event_id)
            """
        )
        if pending == 0:
            return
        await asyncio.sleep(0.5)


async def check(
    pool: asyncpg.Pool,
    traffic: Traffic,
    faults: Sequence[Fault],
    homeserver: FaultyAnswers,
    webhook: FaultyAnswers,
    figures: Figures,
    starts: dict[str, int],
    commands: Destination | None = None,
) -> Findings:
    """Every check of the issue; fills ``figures`` and returns the violations."""
    found = Findings()
    # Answers: only signatures, final refusals, 503 with Retry-After, never a hang.
    by_event: dict[str, set[str]] = defaultdict(set)
    for answer in traffic.answers:
        figures.requests[answer.kind] += 1
        if _in_window(answer, faults):
            figures.during_faults[answer.outcome] += 1
        if answer.outcome in ("bad", "hang") or (
            answer.outcome == "transport" and not _unreachable_allowed(answer, faults)
        ):
            found.bad_answers.append(
                f"{answer.kind} {answer.key} via {answer.gateway}: {answer.outcome} "
                f"{answer.detail} after {answer.ended - answer.started:.1f}s"
            )
        if answer.verdict:
            by_event[answer.key].add(answer.verdict)
    # No flipped verdict: one answer per event, and the stored verdict agrees.
    rows = await pool.fetch(
        "SELECT event_id, class, sender, origin FROM verdicts WHERE event_id = ANY($1::text[])",
        list(by_event),
    )
    stored = {r["event_id"]: r for r in rows}
    for event_id, verdicts in by_event.items():
        figures.verdicts_checked += 1
        if len(verdicts) > 1:
            found.flipped.append(f"{event_id}: answered {sorted(v[:40] for v in verdicts)}")
        row = stored.get(event_id)
        if row is None:
            found.lost.append(
                f"{event_id}: answered {next(iter(verdicts))[:8]} but no stored verdict"
            )
            continue
        refused = any(v.startswith("refused") for v in verdicts)
        if refused != (row["class"] == 2):
            found.flipped.append(
                f"{event_id}: answered {'refused' if refused else 'signed'}, "
                f"stored class {row['class']}"
            )
        expected_refused = traffic.events[event_id][2] if event_id in traffic.events else None
        if expected_refused is not None and expected_refused != refused:
            found.flipped.append(
                f"{event_id}: {'keyword' if expected_refused else 'neutral'} event "
                f"{'refused' if refused else 'signed'}"
            )
    # Nothing lost, nothing twice: every prohibited verdict was redacted (where the
    # moderator should) and reported, each once.
    prohibited = await pool.fetch(
        """
        SELECT v.event_id, v.sender, v.origin, v.published, m.status AS redaction,
               w.status AS webhook
        FROM verdicts v
        LEFT JOIN moderation_actions m ON m.event_id = v.event_id
        LEFT JOIN webhook_deliveries w ON w.event_id = v.event_id
        WHERE v.class = 2
        """
    )
    redactions: dict[str, list[tuple[str, Any]]] = defaultdict(list)  # event -> (txn, exch)
    for exchange in homeserver.exchanges:
        parsed = _exchange_event(exchange.path)
        if parsed is not None:
            redactions[parsed[0]].append((parsed[1], exchange))
    posts: dict[str, list[Any]] = defaultdict(list)
    for exchange in webhook.exchanges:
        if exchange.method == "POST":
            posts[exchange.headers.get("idempotency-key", "")].append(exchange)
    for row in prohibited:
        event_id = row["event_id"]
        figures.prohibited_checked += 1
        should_redact = server_name_of(row["sender"]) != row["origin"]
        done = [e for _, e in redactions[event_id] if e.mode != "drop" and 200 <= e.status < 300]
        if should_redact:
            if row["redaction"] != "done" or not done:
                found.lost.append(
                    f"{event_id}: redaction {row['redaction']}, homeserver saw {len(done)}"
                )
            figures.redactions += bool(done)
        txns = {txn for txn, e in redactions[event_id] if e.mode != "drop"}
        if len(txns) > 1:
            found.duplicates.append(f"{event_id}: redacted with {len(txns)} transaction IDs")
        _after_success(
            found, event_id, [e for _, e in redactions[event_id]], faults, "moderator", "redaction"
        )
        delivered = [e for e in posts[event_id] if e.mode != "drop" and 200 <= e.status < 300]
        if row["webhook"] != "delivered" or not delivered:
            found.lost.append(f"{event_id}: webhook {row['webhook']}, target got {len(delivered)}")
        figures.webhook_deliveries += bool(delivered)
        _after_success(found, event_id, posts[event_id], faults, "webhooks", "webhook")
    # The moderation bot's server processed one command per event (transaction IDs
    # it accepted before are not processed again).
    if commands is not None:
        processed = Counter(commands.event_ids())
        for row in prohibited:
            if server_name_of(row["sender"]) == row["origin"]:
                continue  # no command for a refusal the sender's own server asked about
            count = processed.pop(row["event_id"], 0)
            figures.commands += bool(count)
            if count == 0:
                found.lost.append(f"{row['event_id']}: no command reached the bot's server")
            elif count > 1:
                found.duplicates.append(f"{row['event_id']}: {count} commands processed")
        for event_id in processed:
            found.duplicates.append(f"{event_id}: a command for no due prohibited verdict")
    unknown = set(posts) - {r["event_id"] for r in prohibited}
    for key in sorted(unknown):
        found.duplicates.append(f"webhook with idempotency key {key!r} of no prohibited verdict")
    # A 503 is asked again until final: within the bound after the fault it fell in.
    for chain in traffic.retries:
        # Measured from the end of the last fault the event's asks ran into (faults
        # follow each other within seconds: a 503 of one may be retried into the next).
        fault = _fault_at(faults, chain.first_unavailable)
        later = [
            f for f in faults
            if chain.final and f.started <= chain.final and f.recovered >= chain.first_unavailable
        ]  # fmt: skip
        if later:
            fault = max(later, key=lambda f: f.ended)
        reference = max(chain.first_unavailable, fault.ended if fault else 0.0)
        bound = RECOVERY_BOUND[fault.kind] if fault else 10.0
        name = fault.name if fault else "no fault"
        if fault and fault.started > chain.first_unavailable:
            name = f"the faults up to {name}"
        figures.retried += 1
        if not chain.final:
            found.lost.append(
                f"{chain.event_id}: 503 during {name}, no verdict after {RETRY_FOR:.0f}s of retries"
            )
            continue
        waited = chain.final - reference
        figures.longest_retry = max(figures.longest_retry, waited)
        if waited > bound:
            asks = ", ".join(
                f"+{a.started - reference:.1f}s {a.gateway} {a.outcome} "
                f"({a.ended - a.started:.1f}s)"
                for a in traffic.answers
                if a.key == chain.event_id and a.started >= chain.first_unavailable - 15
            )
            found.slow_recoveries.append(
                f"{chain.event_id}: 503 during {name}, final answer {waited:.1f}s after the "
                f"fault ended (bound {bound:.0f}s); asks since the fault ended: {asks}"
            )
    # With Redis down, events first asked about meanwhile still get verdicts (M6).
    for fault in faults:
        if fault.kind != "restart" or fault.target != "redis":
            continue
        outage = [
            a for a in traffic.answers
            if a.kind == "sign"
            and fault.down_at + REDIS_GRACE <= a.started and a.ended <= fault.ended
            and abs(traffic.created.get(a.key, 0.0) - a.started) < 0.5
        ]  # fmt: skip
        final = [a for a in outage if a.outcome in ("signed", "refused")]
        timeline = Counter(
            (int(a.started - fault.down_at), a.outcome, a.detail[:70]) for a in outage
        )
        print(f"Redis down: new events by second since, outcome: {sorted(timeline.items())}")
        figures.redis_outage_asked += len(outage)
        figures.redis_outage_answered += len(final)
        if len(final) < len(outage):
            found.redis_outage.append(
                f"Redis down {fault.ended - fault.down_at:.1f}s: {len(outage) - len(final)} of "
                f"the {len(outage)} new events asked about meanwhile got no verdict "
                f"({dict(Counter(a.outcome for a in outage))}; review M6: which filter or "
                f"store could not run is in the gateways' 'filter worker could not judge "
                f"event' lines)"
            )
    # No process exited but those the suite killed.
    for name, started in sorted(starts.items()):
        kills = sum(1 for f in faults if f.kind == "kill" and f.target == name)
        if started - 1 != kills:
            found.unplanned_exits.append(
                f"{name}: started {started} times, killed {kills} times (see its output)"
            )
    # Recovery within the bound after every fault.
    for fault in faults:
        figures.faults[fault.kind] += 1
        figures.recovery[fault.kind].append(fault.recovery_seconds)
        if fault.recovery_seconds > RECOVERY_BOUND[fault.kind]:
            found.slow_recoveries.append(
                f"{fault.name}: {fault.recovery_seconds:.1f}s (bound {RECOVERY_BOUND[fault.kind]:.0f}s)"  # noqa: E501
            )
    figures.duplicates = len(found.duplicates)
    figures.lost = len(found.lost)
    figures.flipped = len(found.flipped)
    figures.bad_answers = len(found.bad_answers)
    figures.slow_recoveries = len(found.slow_recoveries)
    figures.unplanned_exits = len(found.unplanned_exits)
    return found


def _after_success(
    found: Findings, event_id: str, exchanges: Sequence[Any], faults: Sequence[Fault],
    service: str, what: str,
) -> None:  # fmt: skip
    """A request repeated after the caller saw it succeed is a duplicate, unless the
    caller could not record the success (``_could_not_record``)."""
    ordered = sorted(exchanges, key=lambda e: e.at)
    for i, first in enumerate(ordered):
        if not first.clean:
            continue
        for later in ordered[i + 1 :]:
            if not _could_not_record(faults, service, first.at, later.at):
                found.duplicates.append(
                    f"{event_id}: {what} sent again {later.at - first.at:.1f}s after a clean answer"
                )
        break


async def eventually(check_fn: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Poll ``check_fn`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check_fn():
                return True
        await asyncio.sleep(0.2)
    return False
