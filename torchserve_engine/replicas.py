"""The TorchServe replicas behind one gRPC target: their addresses, a channel each, a rotation.

gRPC's own ``dns:///`` resolver with ``round_robin`` would spread calls over replicas too,
but it cannot send each replica its own inference key (TorchServe 0.12 draws a random key per
server) and re-resolves only when a connection breaks, so replicas added later never get
traffic. Here the addresses are resolved by cnnserve itself:

- ``dns:///host:port`` (or ``dns:host:port``): ``socket.getaddrinfo`` in a thread, again every
  ``resolve_interval_s``; Docker's and Kubernetes' DNS answer with one address per replica;
- ``ipv4:a:p,b:p`` / ``ipv6:[a]:p,...`` and a plain ``host:port``: a fixed list.

Each address gets its own ``grpc.aio`` channel. :meth:`ReplicaPool.pick` takes turns over the
replicas not marked down; an address that disappears leaves the rotation at once and its
channel closes when its last call has finished; a new address joins at the next resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cnnserve.protocol import torchserve_inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

#: How long a replica that answered UNAVAILABLE stays out of the rotation (gRPC reconnects to
#: it in the background meanwhile, at most MAX_RECONNECT_BACKOFF_MS apart).
DOWN_S = 1.0


@dataclass(frozen=True, order=True)
class Address:
    """One replica's address as the gateway reaches it."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


#: Returns the replicas' current addresses; blocking calls are fine (it runs in a thread).
Resolver = Callable[[], Sequence[Address]]


def _host_port(text: str, target: str) -> Address:
    """``host:port`` or ``[v6]:port`` as an :class:`Address`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"TorchServe target {target!r}: expected host:port, got {text!r}")
    return Address(host.removeprefix("[").removesuffix("]"), int(port))


def resolve_dns(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to right now, sorted, each once."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({Address(str(info[4][0]), port) for info in found})


def parse_target(target: str) -> tuple[Resolver, bool]:
    """The resolver for a gRPC ``target``, and whether its answer can change (DNS)."""
    dns = next((p for p in ("dns:///", "dns:") if target.startswith(p)), None)
    if dns is not None:
        named = _host_port(target.removeprefix(dns), target)
        return functools.partial(resolve_dns, named.host, named.port), True
    listed = next((p for p in ("ipv4:", "ipv6:") if target.startswith(p)), None)
    if listed is not None:
        fixed = [_host_port(part, target) for part in target.removeprefix(listed).split(",")]
    elif "://" in target or target.startswith("unix:"):
        raise ValueError(
            f"TorchServe target {target!r}: use host:port, dns:///host:port or ipv4:a:p,b:p"
        )
    else:
        fixed = [_host_port(target, target)]
    return functools.partial(list, fixed), False


@dataclass(eq=False)
class Replica:
    """One TorchServe: its address, channel and stub, and whether it is in the rotation."""

    address: Address
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceAPIsServiceStub
    #: Calls running on it now; a removed replica's channel closes when this reaches 0.
    in_flight: int = 0
    #: ``time.monotonic()`` until which it stays out of the rotation.
    down_until: float = 0.0
    removed: bool = False
    closing: asyncio.Task[None] | None = field(default=None, repr=False)

    def usable(self, now: float) -> bool:
        """Not marked down and its channel not failing to connect."""
        state = self.channel.get_state(try_to_connect=False)
        return now >= self.down_until and state != grpc.ChannelConnectivity.TRANSIENT_FAILURE


class ReplicaPool:
    """The replicas behind ``target``, each on its own channel, taken in turns.

    Create it inside the running event loop. ``resolver`` replaces the target's own
    resolution (the target still names the service in messages); with one, or a ``dns:``
    target, addresses are re-resolved every ``resolve_interval_s``.
    """

    def __init__(
        self,
        target: str,
        channel_options: Sequence[tuple[str, Any]],
        resolve_interval_s: float = 5.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.target = target
        own_resolver, dynamic = parse_target(target)
        self._resolver = resolver or own_resolver
        self._options = list(channel_options)
        self._interval_s = resolve_interval_s
        self._replicas: dict[Address, Replica] = {}
        #: Removed replicas whose channels are not closed yet (calls still ran on them).
        self._draining: set[Replica] = set()
        self._turn = 0
        self._resolved = False
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        if resolver is None and not dynamic:
            self._update(own_resolver())
        else:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    @property
    def addresses(self) -> list[Address]:
        """The addresses in the rotation now (down or not), sorted."""
        return sorted(self._replicas)

    async def all(self) -> list[Replica]:
        """Every replica in the rotation (a ``dns:`` target is resolved the first time)."""
        if not self._resolved and self._refresher is not None:
            await self.refresh()
        return [self._replicas[address] for address in sorted(self._replicas)]

    async def refresh(self) -> None:
        """Resolve the addresses now and update the rotation; a failure keeps the old ones."""
        async with self._lock:
            try:
                addresses = await asyncio.to_thread(self._resolver)
            except OSError as exc:
                logger.warning("could not resolve TorchServe at %s: %s", self.target, exc)
                return
            self._update(addresses)
            self._resolved = True

    async def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The next replica in turn that is not in ``exclude``; ``None`` when none is left.

        Replicas marked down are passed over while others are usable; when all are down, the
        one down longest is tried anyway (it may be back, and a caller learns fast if not).
        """
        candidates = [r for r in await self.all() if r not in exclude]
        if not candidates:
            return None
        now = time.monotonic()
        self._turn += 1
        for offset in range(len(candidates)):
            replica = candidates[(self._turn + offset) % len(candidates)]
            if replica.usable(now):
                return replica
        return min(candidates, key=lambda r: r.down_until)

    @staticmethod
    def mark_down(replica: Replica) -> None:
        """Take ``replica`` out of the rotation for :data:`DOWN_S` (it answered UNAVAILABLE)."""
        replica.down_until = time.monotonic() + DOWN_S

    @contextlib.contextmanager
    def calling(self, replica: Replica) -> Iterator[None]:
        """Count a call on ``replica``, so a removed replica's channel waits for it."""
        replica.in_flight += 1
        try:
            yield
        finally:
            replica.in_flight -= 1
            if replica.removed and replica.in_flight == 0:
                self._close_later(replica)

    async def close(self) -> None:
        """Stop resolving and close every channel; calls in flight are cancelled."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        replicas, self._replicas = list(self._replicas.values()), {}
        for replica in replicas:
            await replica.channel.close()
        for replica in list(self._draining):
            await (replica.closing or replica.channel.close())
        self._draining.clear()

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)

    def _update(self, addresses: Sequence[Address]) -> None:
        """Add channels for new addresses; retire those of addresses that went away."""
        wanted = set(addresses)
        for address in sorted(wanted - self._replicas.keys()):
            channel = grpc.aio.insecure_channel(str(address), options=self._options)
            stub = pb_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
            self._replicas[address] = Replica(address, channel, stub)
            logger.info("TorchServe replica %s joins the rotation of %s", address, self.target)
        for address in sorted(self._replicas.keys() - wanted):
            replica = self._replicas.pop(address)
            replica.removed = True
            self._draining.add(replica)
            logger.info("TorchServe replica %s leaves the rotation of %s", address, self.target)
            if replica.in_flight == 0:
                self._close_later(replica)

    def _close_later(self, replica: Replica) -> None:
        """Close a removed replica's channel (no call uses it any more)."""
        if replica.closing is None:
            replica.closing = asyncio.get_running_loop().create_task(replica.channel.close())
            replica.closing.add_done_callback(lambda _: self._draining.discard(replica))
