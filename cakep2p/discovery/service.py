"""Zero-configuration discovery over mDNS/DNS-SD: announce this node's capacity and keep a live directory of peers.

Records carry a short TTL (120 s; tests lower it with env CAKEP2P_MDNS_TTL=<seconds>). A clean stop sends
goodbye packets; a node that vanishes is dropped when its SRV record expires: we re-query each peer's SRV/TXT
at 75% of its TTL (python-zeroconf's browser only refreshes PTR records, whose TTL it raises to 1125 s).

The cluster fingerprint in TXT is public, so anyone on the LAN can announce a "member". Given a `verify` callback
(the node pings over CURVE, which only a holder of the cluster key can answer), an announcement of our cluster is
listed only once it has proven itself at its address and port; until then it waits, unlisted, among at most
MAX_UNVERIFIED others, and it can never make this node change its identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Awaitable, Callable

from zeroconf import (DNSOutgoing, DNSQuestion, InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange,
                      current_time_millis)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_A, _TYPE_PTR, _TYPE_SRV, _TYPE_TXT

from cakep2p.discovery.directory import PeerDirectory
from cakep2p.discovery.records import PeerInfo, encode_txt, parse_txt, peer_from_txt
from cakep2p.network import announce_addresses

log = logging.getLogger(__name__)

SERVICE_TYPE = "_cakep2p._tcp.local."
TTL_ENV = "CAKEP2P_MDNS_TTL"
DEFAULT_TTL = 120
ADDRESS_CHECK_INTERVAL_S = 3.0
MAX_UNVERIFIED = 32          # announcements of our cluster waiting to prove themselves
VERIFY_RETRY_S = (1.0, 30.0)  # the first retry of an unproven announcement, doubling up to the second
Verify = Callable[[PeerInfo], Awaitable[bool]]


def mdns_ttl() -> int:
    """Record TTL in seconds: CAKEP2P_MDNS_TTL (tests only) or the RFC 6762 host default of 120 s."""
    try:
        return max(1, int(os.environ.get(TTL_ENV, DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


class Discovery:
    """Announces one node and browses for others; all methods run on one asyncio loop."""

    def __init__(self, directory: PeerDirectory, cluster_fingerprint: str, interfaces: list[str] | None = None,
                 on_duplicate_id: Callable[[PeerInfo], None] | None = None,
                 on_addresses_changed: Callable[[list[str]], None] | None = None, verify: Verify | None = None) -> None:
        self.directory = directory
        self.verify = verify
        self.cluster_fingerprint = cluster_fingerprint
        self.interfaces = list(interfaces) if interfaces else None
        self.on_duplicate_id = on_duplicate_id
        self.on_addresses_changed = on_addresses_changed
        self.instance_name: str | None = None          # our final mDNS instance name once announced
        self.addresses: list[str] = announce_addresses(self.interfaces)
        self.started_at_ms = int(time.time() * 1000)
        self._ttl = mdns_ttl()
        self._host = f"cakep2p-{secrets.token_hex(6)}.local."   # per run: clones never fight over an A record
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._service: ServiceInfo | None = None
        self._announced: PeerInfo | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_query_ms: dict[str, float] = {}
        self._ignored: dict[str, str] = {}
        self._duplicate_reported: set[str] = set()
        self._proven: dict[str, tuple[str, str, int]] = {}        # name -> (node id, address, port) it answered as
        self._unproven: dict[str, tuple[int, float]] = {}         # name -> (failed checks, when to check again)
        self._checking: set[str] = set()
        self._lock = asyncio.Lock()
        self._stopping = False

    @property
    def full_name(self) -> str | None:
        return self._service.name if self._service else None

    async def start(self) -> None:
        if self.interfaces:
            self._zeroconf = AsyncZeroconf(interfaces=self.interfaces)
        else:
            self._zeroconf = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._spawn(self._maintain())

    async def announce(self, info: PeerInfo) -> None:
        """Register our service (first call; probes for a unique instance name) or update its TXT in place."""
        assert self._zeroconf is not None, "Discovery.start() first"
        async with self._lock:
            if not self.addresses:
                log.warning("no network interface is up: announcing 127.0.0.1, only this machine can join")
                self.addresses = ["127.0.0.1"]
            if self._service is None:
                self._service = self._service_info(f"{info.name}.{SERVICE_TYPE}", info)
                self.instance_name = info.name
                await self._zeroconf.async_register_service(self._service, allow_name_change=True)
                self.instance_name = self._service.name[:-len(SERVICE_TYPE) - 1]
            else:
                self._service = self._service_info(self._service.name, info)
                await self._zeroconf.async_update_service(self._service)
            if self._announced is None or self._announced.node_id != info.node_id:
                self._duplicate_reported.clear()
            self._announced = info

    def _service_info(self, full_name: str, info: PeerInfo) -> ServiceInfo:
        return ServiceInfo(SERVICE_TYPE, full_name, port=info.port, properties=encode_txt(info, self.started_at_ms),
                           server=self._host, host_ttl=self._ttl, other_ttl=self._ttl,
                           parsed_addresses=self.addresses)

    async def withdraw(self) -> None:
        """Send goodbye packets so peers drop us at once."""
        async with self._lock:
            if self._service is not None and self._zeroconf is not None:
                sent = await self._zeroconf.async_unregister_service(self._service)
                await sent
            self._service = None

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._zeroconf is not None:
            await self.withdraw()
            if self._browser is not None:
                await self._browser.async_cancel()
            await self._zeroconf.async_close()
            self._zeroconf = None

    # ---- browsing --------------------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if self._stopping:
            return
        if state_change is ServiceStateChange.Removed:
            self._forget(name, "said goodbye")
        else:
            self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        if name == self.full_name or self._stopping or self._reconcile(name):
            return
        try:
            await AsyncServiceInfo(SERVICE_TYPE, name).async_request(self._zeroconf.zeroconf, 1500)
        except Exception as error:  # shutting down, or the network went away: the next tick retries
            log.debug("could not resolve %r: %s", name, error)
            return
        if not self._stopping:
            self._reconcile(name)

    def _forget(self, name: str, why: str) -> None:
        self._last_query_ms.pop(name, None)
        self._ignored.pop(name, None)
        self._proven.pop(name, None)
        self._unproven.pop(name, None)
        if self.directory.remove(name) is not None:
            log.debug("%r %s", name, why)

    def _reconcile(self, name: str) -> bool:
        """Make the directory match the cache for one instance; False while its records are incomplete."""
        cache = self._zeroconf.zeroconf.cache
        now = current_time_millis()
        service = _newest(cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN), now)
        text = _newest(cache.get_all_by_details(name, _TYPE_TXT, _CLASS_IN), now)
        if service is None:
            self._forget(name, "expired")
            return False
        addresses = [socket.inet_ntoa(record.address)
                     for record in cache.get_all_by_details(service.server, _TYPE_A, _CLASS_IN)
                     if not record.is_expired(now) and len(record.address) == 4]
        if text is None or not addresses:
            return False
        short_name = _short(name)
        try:
            peer, started_at_ms = peer_from_txt(short_name, parse_txt(text.text), sorted(set(addresses)),
                                                service.port, self.cluster_fingerprint)
        except (ValueError, KeyError) as error:
            if self._ignored.get(name) != str(error):
                log.debug("ignoring %r: not a valid cakep2p announcement (%s)", name, error)
                self._ignored[name] = str(error)
            self.directory.remove(name)
            return True
        self._ignored.pop(name, None)
        if self.verify is not None and peer.status == "ok" and self._proven.get(name) != _claim(peer):
            self._prove_later(name, peer)
            return True
        if peer.status == "ok":
            self._check_duplicate(peer, started_at_ms)
        self.directory.put(name, peer)
        return True

    def unproven(self) -> list[str]:
        """Instance names of the announcements of our cluster that have not proven it (yet): never planned."""
        listed = set(self.directory.keys())
        return sorted(_short(name) for name in list(self._unproven) if name not in listed)

    def proving(self) -> bool:
        """Whether an announcement of our cluster is still being checked for the first time: a plan made now
        could leave out a member that is about to prove itself."""
        return any(not failures for failures, _ in list(self._unproven.values()))

    def _prove_later(self, name: str, peer: PeerInfo) -> None:
        """Keep a new claim of our cluster unlisted until it answers as who it claims to be. A member listed under
        its last proven claim stays listed while the new one (a new address or port) is checked: it is updated
        when that proves, dropped when it fails."""
        self._proven.pop(name, None)
        if name not in self._unproven and not self._room_for_unproven():
            log.debug("ignoring %r for now: %d announcements already wait to prove themselves", name, MAX_UNVERIFIED)
            self.directory.remove(name)
            return
        failures, due = self._unproven.setdefault(name, (0, 0.0))
        if name not in self._checking and time.monotonic() >= due:
            self._checking.add(name)
            self._spawn(self._prove(name, peer, failures))

    def _room_for_unproven(self) -> bool:
        """Room for one more waiting announcement; full, the one that failed most often (not being checked) goes."""
        if len(self._unproven) < MAX_UNVERIFIED:
            return True
        failed = [(failures, name) for name, (failures, _) in self._unproven.items()
                  if failures and name not in self._checking]
        if not failed:
            return False
        del self._unproven[max(failed)[1]]
        return True

    async def _prove(self, name: str, peer: PeerInfo, failures: int) -> None:
        try:
            proven = await self.verify(peer)
        except Exception as error:  # noqa: BLE001  (a failed check is a "no"; the next one may succeed)
            log.debug("checking %r failed: %s", name, error)
            proven = False
        finally:
            self._checking.discard(name)
        if self._stopping or name not in self._unproven:
            return
        if proven:
            del self._unproven[name]
            self._proven[name] = _claim(peer)
            self._reconcile(name)
            return
        self.directory.remove(name)
        if not failures:
            log.info("%r at %s:%d announces this cluster but did not answer an authenticated ping; not used",
                     peer.name, peer.address, peer.port)
        self._unproven[name] = (failures + 1, time.monotonic() + min(VERIFY_RETRY_S[1],
                                                                     VERIFY_RETRY_S[0] * 2 ** failures))

    def _check_duplicate(self, peer: PeerInfo, started_at_ms: int) -> None:
        """Two live nodes with one id (a copied config folder): the later-started one regenerates its id. Only for a
        peer of our cluster that has proven itself (when we verify): nobody else can make us rotate our id."""
        own = self._announced
        if own is None or peer.node_id != own.node_id or peer.name in self._duplicate_reported:
            return
        self._duplicate_reported.add(peer.name)
        we_are_later = (self.started_at_ms, self.instance_name or "") > (started_at_ms, peer.name)
        log.warning("node %r at %s shares our node id %s (copied config folder?); %s", peer.name, peer.address,
                    own.node_id[:8], "we started later and take a new id" if we_are_later else "it will take a new id")
        if we_are_later and self.on_duplicate_id is not None:
            self.on_duplicate_id(peer)

    async def _maintain(self) -> None:
        """Every tick: drop peers whose records expired, refresh those about to, follow our own address changes."""
        tick_s = 1.0
        next_address_check = time.monotonic() + ADDRESS_CHECK_INTERVAL_S
        while True:
            await asyncio.sleep(tick_s)
            check_addresses = self.interfaces is None and time.monotonic() >= next_address_check
            if check_addresses:
                next_address_check = time.monotonic() + ADDRESS_CHECK_INTERVAL_S
            try:
                tick_s = await self._maintain_once(check_addresses)
            except Exception:  # one bad tick must not end expiry checks for good
                log.exception("discovery maintenance failed; retrying")
                tick_s = 1.0

    async def _maintain_once(self, check_addresses: bool) -> float:
        cache = self._zeroconf.zeroconf.cache
        now = current_time_millis()
        names = {record.alias for record in cache.get_all_by_details(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN)
                 if not record.is_expired(now)} | set(self.directory.mdns_keys())
        shortest_ttl_s = float(DEFAULT_TTL)
        for name in names - {self.full_name}:
            shortest_ttl_s = min(shortest_ttl_s, self._refresh_if_aging(name, now))
            self._reconcile(name)
        if check_addresses:
            await self._follow_address_change()
        return min(1.0, max(0.1, shortest_ttl_s / 10))   # several looks inside each refresh window

    def _refresh_if_aging(self, name: str, now: float) -> float:
        """Query SRV+TXT again from 75% of their TTL on (RFC 6762 5.2); returns that TTL in seconds."""
        service = _newest(self._zeroconf.zeroconf.cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN), now)
        if service is None:
            return float(DEFAULT_TTL)
        ttl_ms = service.ttl * 1000
        if now - service.created < 0.75 * ttl_ms or now - self._last_query_ms.get(name, 0) < 0.1 * ttl_ms:
            return float(service.ttl)
        self._last_query_ms[name] = now
        query = DNSOutgoing(_FLAGS_QR_QUERY)
        query.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
        query.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
        self._zeroconf.zeroconf.async_send(query)
        return float(service.ttl)

    async def _follow_address_change(self) -> None:
        addresses = announce_addresses(None)
        if not addresses or addresses == self.addresses:
            return
        log.info("network addresses changed from %s to %s: re-announcing", ", ".join(self.addresses),
                 ", ".join(addresses))
        self.addresses = addresses
        async with self._lock:       # first the records, so the re-announce on new sockets carries the new address
            if self._service is not None and self._announced is not None:
                self._service = self._service_info(self._service.name, self._announced)
                await self._zeroconf.async_update_service(self._service)
        await self._zeroconf.async_update_interfaces()
        if self.on_addresses_changed is not None:
            self.on_addresses_changed(addresses)


def _claim(peer: PeerInfo) -> tuple[str, str, int]:
    return peer.node_id, peer.address, peer.port


def _newest(records, now: float):
    alive = [record for record in records if not record.is_expired(now)]
    # a superseded unique record is re-stamped to expire in 1 s (RFC 6762 10.2): the live one expires last
    return max(alive, key=lambda record: (record.created + record.ttl * 1000, record.created)) if alive else None


def snapshot_peers(interfaces: list[str] | None, wait_s: float, cluster_fingerprint: str) -> list[PeerInfo]:
    """Browse for wait_s seconds (announcing nothing) and return what was seen; for command-line tools."""
    async def browse() -> list[PeerInfo]:
        directory = PeerDirectory()
        discovery = Discovery(directory, cluster_fingerprint, interfaces)
        await discovery.start()
        try:
            await asyncio.sleep(wait_s)
        finally:
            await discovery.stop()
        return directory.peers()

    return asyncio.run(browse())


def _short(name: str) -> str:
    """An instance name without the service type: what the peer calls itself."""
    return name[:-len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else name
