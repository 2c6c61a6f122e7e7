"""Penalised addresses dropped by the kernel: a socket filter on the listening socket.

An address under a penalty (``client_penalties``) is refused by the HTTP front as its
connections open, but each refusal still costs the gateway an accept, a protocol object,
a write, a shutdown and a close: an attacker who loops on connecting keeps a core busy
with refusals. While any address is penalised, the gateway attaches a classic BPF
program to its listening sockets (``SO_ATTACH_FILTER``, Linux, no privileges needed)
that drops the packets of those addresses (IPv4: the address; IPv6: its /64, as the
penalties count them) before TCP sees them: their connection attempts go unanswered, as
a firewall's DROP would leave them, and cost the gateway nothing. When the last penalty
ends the program is detached.

Bounds: programs are rebuilt at most every ``MIN_UPDATE_INTERVAL_SECONDS``; at most
``MAX_FILTERED`` addresses are in one (the ones penalised longest from now; any others
are still refused by the HTTP front with 429), so the
program stays under the kernel's 4,096 instructions and costs every received packet at
most a few thousand simple instructions while penalties last, nothing otherwise.
Connections accepted while a program is attached keep a copy of it (the kernel's rule
for accepted sockets); it only drops penalised addresses, so it costs them nothing else.

Off with ``PS_HTTP_AUTH_FAILURE_KERNEL_DROP=false``, and where the platform has no
socket filters (the HTTP front refuses penalised connections either way). Shown in
``warden_http_kernel_dropped_clients``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Iterable, Sequence

from prometheus_client import Gauge

from warden.runtime.client_penalties import ClientPenalties

logger = logging.getLogger(__name__)

# Linux <asm-generic/socket.h>.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# At most this many addresses in one program: 5 instructions per IPv6 prefix, 2 per
# IPv4 address, well under BPF_MAXINSNS (4096) with the program's few others.
MAX_FILTERED = 512
# New penalties are added to the program at most this often (building one with 512
# prefixes takes a few milliseconds; an attacker earning penalties with many addresses
# must not buy that per penalty). Meanwhile the HTTP front refuses them.
MIN_UPDATE_INTERVAL_SECONDS = 0.25

KERNEL_DROPPED_CLIENTS = Gauge(
    "warden_http_kernel_dropped_clients",
    "Penalised client addresses (IPv6: /64 prefixes) whose packets the kernel drops at "
    "the gateway's listening sockets (as of the last change; at most 512).",
)

# Classic BPF opcodes (<linux/bpf_common.h>).
_LD_W_ABS = 0x20  # A = 32-bit word at k (network byte order)
_LD_B_ABS = 0x30  # A = byte at k
_ALU_RSH_K = 0x74  # A >>= k
_JMP_JA = 0x05  # pc += k
_JMP_JEQ_K = 0x15  # pc += (A == k) ? jt : jf
_RET_K = 0x06  # accept k bytes of the packet (0: drop)
# Offsets from the packet's network header (SKF_NET_OFF) rather than its TCP header.
_NET = -0x100000
_DROP = 0
_KEEP = 0xFFFFFFFF


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_program(buckets: Iterable[str]) -> list[bytes]:
    """A program dropping packets from each IPv4 address or IPv6 /64 in ``buckets``
    (``client_bucket`` strings: ``192.0.2.1``, ``2001:db8::/64``); others kept."""
    v4: list[int] = []
    v6: list[tuple[int, int]] = []
    for bucket in buckets:
        try:
            network = ipaddress.ip_network(bucket, strict=False)
        except ValueError:
            continue
        prefix = int(network.network_address)
        if network.version == 4:
            v4.append(prefix)
        else:
            v6.append(((prefix >> 96) & 0xFFFFFFFF, (prefix >> 64) & 0xFFFFFFFF))
    v4_section = [_insn(_LD_W_ABS, _NET + 12)]  # IPv4 source address
    for address in v4:
        v4_section += [_insn(_JMP_JEQ_K, address, 0, 1), _insn(_RET_K, _DROP)]
    v4_section.append(_insn(_RET_K, _KEEP))
    v6_section = [_insn(_JMP_JEQ_K, 6, 1, 0), _insn(_RET_K, _KEEP)]
    for high, low in v6:
        # The source address's first two words (offsets 8 and 12): its /64.
        v6_section += [
            _insn(_LD_W_ABS, _NET + 8),
            _insn(_JMP_JEQ_K, high, 0, 3),
            _insn(_LD_W_ABS, _NET + 12),
            _insn(_JMP_JEQ_K, low, 0, 1),
            _insn(_RET_K, _DROP),
        ]
    v6_section.append(_insn(_RET_K, _KEEP))
    return [
        _insn(_LD_B_ABS, _NET + 0),  # version and header length
        _insn(_ALU_RSH_K, 4),
        _insn(_JMP_JEQ_K, 4, 1, 0),  # IPv4: the next section; else jump over it
        _insn(_JMP_JA, len(v4_section)),
        *v4_section,
        *v6_section,
    ]


def supported() -> bool:
    """Whether this platform has classic BPF socket filters."""
    return sys.platform.startswith("linux")


def attach(sock: socket.socket, program: Sequence[bytes] | None) -> None:
    """Attach ``program`` to ``sock`` (replacing any), or detach it (None)."""
    if program is None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # there was none
                raise
        return
    code = ctypes.create_string_buffer(b"".join(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }; the kernel
    # copies the program during the call.
    fprog = struct.pack("@HP", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class KernelRefusal:
    """Keeps the listening sockets' filter in step with the penalties."""

    def __init__(self, penalties: ClientPenalties, sockets: Sequence[socket.socket]) -> None:
        # The servers' own socket objects: a duplicate descriptor would keep a listener
        # open after its server closed it.
        self._sockets = list(sockets)
        self._penalties = penalties
        self._scheduled: asyncio.Handle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._filtered: frozenset[str] = frozenset()
        self._broken = False
        self._last_update = -MIN_UPDATE_INTERVAL_SECONDS
        penalties.on_penalty(self._changed)
        if penalties.penalties():  # earned while the servers were starting
            self._changed()

    def _changed(self) -> None:
        # Coalesced: a burst of new penalties makes one program, and programs are made
        # at most every MIN_UPDATE_INTERVAL_SECONDS.
        if self._scheduled is None and not self._broken:
            loop = asyncio.get_running_loop()
            self._scheduled = loop.call_at(
                max(loop.time(), self._last_update + MIN_UPDATE_INTERVAL_SECONDS), self.update
            )

    def update(self) -> None:
        """Attach the program for the addresses penalised now (or detach it)."""
        if self._scheduled is not None:
            self._scheduled.cancel()  # called directly: this update covers it
            self._scheduled = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        loop = asyncio.get_running_loop()
        now = self._last_update = loop.time()
        live = sorted(self._penalties.penalties().items(), key=lambda item: -item[1])
        chosen = frozenset(bucket for bucket, _ in live[:MAX_FILTERED])
        if chosen != self._filtered:
            program = build_program(sorted(chosen)) if chosen else None
            try:
                for sock in self._sockets:
                    attach(sock, program)
            except OSError as exc:
                # The HTTP front still refuses them; no point trying again. No listener
                # keeps a program that would no longer be updated.
                self._broken = True
                self._detach_all()
                logger.warning(
                    "cannot filter penalised addresses in the kernel; the HTTP front refuses them",
                    extra={"error": str(exc)},
                )
                return
            self._filtered = chosen
            KERNEL_DROPPED_CLIENTS.set(len(chosen))
        if live:
            # Again when the first of them ends (the clocks agree: both monotonic), and
            # not sooner than the interval: penalties ending one after another, as fast
            # as an attacker earned them, must not buy a program each either.
            soonest = min(until for _, until in live)
            delay = max(0.0, soonest - self._penalties.now()) + 0.01
            self._expiry = loop.call_at(now + max(delay, MIN_UPDATE_INTERVAL_SECONDS), self.update)

    def close(self) -> None:
        """Stop following the penalties and detach the filter (from the listeners
        still open)."""
        self._penalties.on_penalty(None)
        for handle in (self._scheduled, self._expiry):
            if handle is not None:
                handle.cancel()
        if self._filtered:
            self._detach_all()

    def _detach_all(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # closed already
                attach(sock, None)
        self._filtered = frozenset()
        KERNEL_DROPPED_CLIENTS.set(0)
