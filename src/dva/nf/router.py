"""``router``: an IPv4 router (RFC 1812): LPM routes, ARP, TTL, ICMP.

Ports: the names in ``ports`` (a mapping name -> address), at most 63.

Config::

    type: router
    ports:
      lan: {ip: 10.0.0.1/24, mac: 02:00:00:00:01:01}
      wan: {ip: 198.51.100.2/24}      # mac derived: 02 + 5 bytes of sha1("r1.wan")
    routes:
      - {prefix: 0.0.0.0/0, via: 198.51.100.1}   # next hop in a connected subnet
      - {prefix: 10.9.0.0/16, port: lan}         # direct: ARP for the destination itself
    arp_timeout: 300       # seconds an ARP entry lives (refreshed when the peer ARPs)
    arp_cache_size: 4096   # ARP entries at most (per router)
    arp_queue: 64          # packets held while their next hop is resolved
    arp_hold: 1.0          # seconds a held packet waits for the ARP reply
    icmp_rate: 100         # ICMP errors per second (token bucket, burst = rate; 0: none)
    max_routes: 200000     # routes (static + connected) at most

The subnets of the port addresses are connected routes. A route gives ``via`` (the
port is the one whose subnet holds it), ``port`` (direct), or both (``via`` must be
in that port's subnet). Rejected, each at its path in the file: bad addresses, MACs
or prefixes (host bits set), a port address that is its subnet's network or broadcast
address, overlapping port subnets, ``via`` outside every connected subnet (or a
router or broadcast address), an unknown ``port``, a prefix given twice or equal to a
connected subnet (or a router's own or subnet broadcast address), more than
``max_routes`` routes. Duplicate port names are rejected by the YAML loader.

Behaviour, per frame, in this order (drop reasons in ``DROPS``):

* L2: a frame must be addressed to the ingress port's MAC or be a broadcast, else
  ``not_for_me`` (a router is not a bridge; it joins no multicast group). VLAN-tagged
  frames and ethertypes other than IPv4 and ARP (IPv6 included): ``unsupported``. A
  parse error of any kind (``layout.PARSE_ERRORS``): ``malformed``.
* ARP (per port; only the ingress port's own address is answered): a request for it
  is answered out the same port (the request frame is rewritten into the reply) and
  its sender is learned; a reply addressed to it is learned (``arp_consumed``). A
  sender is learned only from inside the port's subnet (not 0.0.0.0, not a router or
  broadcast address) and with a unicast MAC. Anything else -- requests for other
  addresses, gratuitous ARP, replies to others -- only refreshes an entry that
  already exists (RFC 826 merge flag) and is dropped ``arp_not_for_me``: unsolicited
  ARP cannot fill the cache. Learning an address releases the packets held for it.
* IPv4: bad header checksum (``bad_checksum``); IPv4 in a link-layer broadcast frame,
  to 255.255.255.255, a multicast group or a connected subnet's broadcast address
  (``broadcast``: no multicast routing, no directed-broadcast forwarding, RFC 2644);
  source in 0/8, 127/8, 224/3 (``martian_src``) or destination in 0/8, 127/8, 240/4
  (``martian_dst``) (RFC 1812 5.3.7); link-local 169.254/16 is never forwarded
  either (RFC 3927).
* To one of the router's addresses (any port: weak host model): an ICMP echo request
  gets an echo reply out the ingress port (MACs and addresses swapped, TTL 64, IP and
  ICMP checksums fixed; a bad ICMP checksum is ``bad_checksum``; a source that is a
  connected subnet's broadcast address is ``martian_src``). Everything else is
  dropped ``not_served``; for UDP an ICMP port unreachable and for protocols other than
  TCP and ICMP a protocol unreachable is sent too (TCP gets nothing: no RST without a
  TCP stack; fragments to the router are not reassembled: dropped, no error).
* Forwarding: TTL <= 1: ICMP time exceeded (11/0), ``ttl_exceeded``. Longest prefix
  match (DIR-24-8, :mod:`dva.nf.lpm`); none: ICMP net unreachable (3/0),
  ``no_route``. Else TTL - 1 with an incremental checksum update (RFC 1624), source
  MAC = egress port's, destination MAC = the next hop's from the ARP cache. Options
  and fragments are forwarded untouched otherwise; there is no MTU, so nothing is
  fragmented. A packet may leave by its ingress port (no ICMP redirects).
* Next hop not in the ARP cache: the packet is held (``HOLD``) in a bounded queue
  (``arp_queue`` packets per router; full: ``arp_queue_full``) and an ARP request is
  broadcast out the egress port when the first packet for that next hop is held, then
  again at most every ``ARP_RETRY`` (90 ms: about once per 100 ms engine tick) while
  packets wait. A next hop that finds the queue full is still ARPed for (same
  spacing), so one dead gateway cannot keep others from resolving. When the next hop
  is learned the held packets go out with its MAC, in the order they came, ahead of
  any later packet to that next hop (one arriving in the same batch as the reply is
  itself held and appended after them). A packet held ``arp_hold`` seconds is dropped
  ``arp_timeout`` (no ICMP host unreachable). The queue is checked on every batch and
  every tick (``ticks = True``); with no traffic and no ticks (offline runs) nothing
  times out.
* ICMP errors (RFC 792, RFC 1812 4.3.2): from the router's address on the port the
  route back to the source leaves by (looked up; none: not sent, ``icmp_no_route``),
  TOS 0xC0, TTL 64, quoting the original IP header and as much of its datagram as
  fits in 576 bytes. Never about an ICMP error, a non-first fragment, or a broadcast,
  multicast or martian address (those are dropped before). Token bucket of
  ``icmp_rate`` per second, burst ``icmp_rate``; over it the error is not sent
  (``icmp_rate_limited``). The error is routed like any packet (held if the source's
  MAC is unknown). Echo replies are not rate-limited.

Generated packets (ARP requests, ICMP errors, released held packets) are rows the
kernel appends to the batch; a new frame takes a pool slot (none free: the packet is
not sent, ``pool_exhausted``). ``max_emit`` = 3 per input row (an ICMP error, the ARP
request for its destination, a same-batch release) and ``emit_reserve`` = 3 x
``arp_queue`` + 8 per batch (every held packet released or timed out, an ARP request
per next hop); the kernel also checks the batch's room and postpones what does not fit
(``emit_deferred``, which these bounds keep at 0).

Port MACs not given are derived: 02 (locally administered, unicast) + the first 5
bytes of sha1("DEVICE.PORT"), so a restart or another worker gets the same MAC.

Route tables: 100k routes validate in about a second and build in a fraction of one
(addresses are parsed once, gateways resolved once each); lookups are O(1).

State (:class:`RouterState`): ``arp`` (shared state, replicated): key ``port << 32 |
ip`` -> (MAC, batch number of the last release), expiring ``arp_timeout`` after it
was learned or refreshed, bounded by ``arp_cache_size`` (full: ``arp_table_full``, not
learned). Local to the worker (not exported): the held-packet queue (whole metadata
rows, next hop, time held, in arrival order), ``pending`` (per next hop with held
packets: how many, when it was last ARPed), the ICMP token bucket, the IP id counter.

Counters: ``EVENTS``. Notes for ``dva trace``: ``NOTES`` (fixed strings: the next-hop
address itself is in the frame shown).

Code: this module holds the config, the state, the per-batch kernel and the device;
the next-hop machinery (ARP, the hold queue, releases) is in :mod:`dva.nf.router_arp`,
ICMP error generation in :mod:`dva.nf.router_icmp`, and the names they share
(``DROPS``, ``EVENTS``, ``NOTES``, indexes) in :mod:`dva.nf.router_defs`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from dva._jit import i64, kernel
from dva.nf.base import MAX_PORTS, Device, DeviceConfig, DeviceState, Name, drop_code
from dva.nf.lpm import Lpm, lpm_lookup
from dva.nf.router_arp import _arp_in, _scan, _send
from dva.nf.router_defs import (
    ARP_RETRY,
    C_ARP_EXPIRED,
    C_ECHO,
    D_BAD_CSUM,
    D_BROADCAST,
    D_MALFORMED,
    D_MARTIAN_DST,
    D_MARTIAN_SRC,
    D_NO_ROUTE,
    D_NOT_FOR_ME,
    D_NOT_SERVED,
    D_TTL,
    D_UNSUPPORTED,
    DROPS,
    EVENTS,
    M32,
    M_EPOCH,
    M_HQN,
    M_REBUILD,
    M_REL_EPOCH,
    N_DIRECT,
    N_ECHO,
    N_NO_ROUTE,
    N_NOT_FOR_ME,
    N_NOT_SERVED,
    N_TTL,
    N_VIA,
    NH_BCAST,
    NH_FWD,
    NH_LOCAL,
    NH_NONE,
    NOTES,
    P_ARP_HOLD,
    P_ARP_TIMEOUT,
    P_ICMP_RATE,
)
from dva.nf.router_icmp import ICMP_TOS, QUOTE_MAX, _icmp_error
from dva.nf.table import I_EXPIRED, HashTable, tbl_lookup, tbl_needs_rebuild, tbl_sweep
from dva.packet import layout as L
from dva.packet.checksum import (
    csum_add,
    csum_fold,
    csum_update16,
    ipv4_header_checksum,
    rd16,
    rd32,
    rd48,
    wr16,
    wr32,
    wr48,
)

# The public names; DROPS, EVENTS, NOTES, ARP_RETRY, QUOTE_MAX and ICMP_TOS are
# defined in router_defs and router_icmp and re-exported from here.
__all__ = [
    "ARP_RETRY",
    "DROPS",
    "EVENTS",
    "ICMP_TOS",
    "NOTES",
    "QUOTE_MAX",
    "Route",
    "Router",
    "RouterConfig",
    "RouterPort",
    "RouterState",
    "derive_mac",
    "mac_str",
    "parse_mac",
    "router_kernel",
]

SWEEP_SLOTS = 64


# -- config ------------------------------------------------------------------------

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


def parse_mac(v: str) -> int:
    if not isinstance(v, str) or not _MAC_RE.match(v):
        raise ValueError(f"bad MAC address {v!r}: expected aa:bb:cc:dd:ee:ff")
    m = int(v.replace(v[2], ""), 16)
    if m >> 40 & 1 or m == 0:
        raise ValueError(f"bad MAC address {v!r}: a port MAC must be unicast and not zero")
    return m


def derive_mac(device: str, port: str) -> int:
    """A locally administered unicast MAC from the device and port names: 02 + the
    first 5 bytes of sha1("device.port")."""
    return 0x02 << 40 | int.from_bytes(hashlib.sha1(f"{device}.{port}".encode()).digest()[:5],
                                       "big")


def mac_str(m: int) -> str:
    return ":".join(f"{b:02x}" for b in m.to_bytes(6, "big"))


def _bad_host(a: ipaddress.IPv4Address) -> str | None:
    if a.is_unspecified or int(a) >> 24 == 0:
        return "in 0.0.0.0/8"
    if a.is_loopback:
        return "a loopback address"
    if int(a) >> 29 == 7:
        return "not a unicast address (multicast, reserved or broadcast)"
    return None


def interface_address(v: str, what: str, example: str) -> str:
    """An interface address ``ADDRESS/LENGTH`` from a config (a unicast host address,
    prefix 1..32, not its subnet's network or broadcast address), canonical."""
    if "/" not in v:
        raise ValueError(f"bad {what} {v!r}: expected ADDRESS/LENGTH, e.g. {example}")
    try:
        itf = ipaddress.IPv4Interface(v)
    except ValueError as e:
        raise ValueError(f"bad {what} {v!r}: {e}") from None
    bad = _bad_host(itf.ip)
    if bad:
        raise ValueError(f"bad {what} {v!r}: {bad}")
    net = itf.network
    if net.prefixlen == 0:
        raise ValueError(f"bad {what} {v!r}: the prefix length must be 1..32")
    if net.prefixlen <= 30 and itf.ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"bad {what} {v!r}: that is the "
                         f"{'network' if itf.ip == net.network_address else 'broadcast'}"
                         f" address of {net}")
    return str(itf)


class RouterPort(BaseModel):
    """One router port: its address with the prefix length, and optionally its MAC."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ip: str
    mac: str | None = None

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return interface_address(v, "port address", "10.0.0.1/24")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return None if v is None else mac_str(parse_mac(v))

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.ip)


def _fast_ip(v: str) -> tuple[int, int] | None:
    """(address, length or -1) of a canonical ``a.b.c.d[/len]``; None: ask ipaddress.

    Route tables hold 100k+ entries: socket's C conversions (no I/O) are several times
    faster than ipaddress, which still parses (and explains) everything unusual.
    """
    addr, sep, ln = v.partition("/")
    try:
        packed = socket.inet_aton(addr)
    except OSError:
        return None
    if socket.inet_ntoa(packed) != addr:  # inet_aton also takes "1.2.3", "0x1.2.3.4"
        return None
    n = -1
    if sep:
        if not (ln.isascii() and ln.isdigit()) or (len(ln) > 1 and ln[0] == "0"):
            return None
        n = int(ln)
        if n > 32:
            return None
    return int.from_bytes(packed, "big"), n


@functools.lru_cache(maxsize=4096)
def _gateway(v: str) -> str:
    """The canonical form of a route's ``via`` (routes share few gateways: cached)."""
    try:
        a = ipaddress.IPv4Address(v)
    except ValueError as e:
        raise ValueError(f"bad next hop {v!r}: {e}") from None
    bad = _bad_host(a)
    if bad:
        raise ValueError(f"bad next hop {v!r}: {bad}")
    return str(a)


class Route(BaseModel):
    """A static route: ``prefix`` via a gateway (``via``) and/or out a ``port``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str
    via: str | None = None
    port: Name | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        f = _fast_ip(v)
        if f is not None and f[1] >= 0 and f[0] & ~(0xFFFFFFFF << (32 - f[1])) & M32 == 0:
            return v
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"bad prefix {v!r}: {e}") from None

    @field_validator("via")
    @classmethod
    def _via(cls, v: str | None) -> str | None:
        return None if v is None else _gateway(v)

    @model_validator(mode="after")
    def _target(self) -> Route:
        if self.via is None and self.port is None:
            raise ValueError("a route needs 'via' (a gateway), 'port', or both")
        return self


def _issue(loc: tuple, msg: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("router_config", "{msg}", {"msg": msg}),
                            loc=loc, input=value)


class RouterConfig(DeviceConfig):
    type: Literal["router"]
    ports: dict[Name, RouterPort]
    routes: list[Route] = []
    arp_timeout: float = Field(default=300.0, gt=0, le=1_000_000)
    arp_cache_size: int = Field(default=4096, ge=1, le=1_000_000)
    arp_queue: int = Field(default=64, ge=1, le=65536)
    arp_hold: float = Field(default=1.0, gt=0, le=3600)
    icmp_rate: float = Field(default=100.0, ge=0, le=1_000_000)
    max_routes: int = Field(default=200_000, ge=1, le=10_000_000)
    # (prefix, length, gateway or 0, port or None) per route, parsed once by _consistent
    _table: list[tuple[int, int, int, str | None]] = PrivateAttr(default_factory=list)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v):
        if not v:
            raise ValueError("a router needs at least one port")
        if len(v) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports per device")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RouterConfig:
        issues: list[InitErrorDetails] = []
        nets = {n: p.interface.network for n, p in self.ports.items()}
        names = list(nets)
        for i, b in enumerate(names):
            for a in names[:i]:
                if nets[a].overlaps(nets[b]):
                    issues.append(_issue(("ports", b, "ip"), f"subnet {nets[b]} overlaps "
                                         f"{nets[a]} of port {a}", self.ports[b].ip))
        reserved: dict[tuple[int, int], str] = {}
        for n, p in self.ports.items():
            net = nets[n]
            reserved[int(net.network_address), net.prefixlen] = \
                f"the connected subnet of port {n}"
            reserved[int(p.interface.ip), 32] = f"the address of port {n}"
            if net.prefixlen <= 30:
                reserved[int(net.broadcast_address), 32] = \
                    f"the broadcast address of port {n}'s subnet"
        seen: dict[tuple[int, int], int] = {}
        gateways: dict[tuple[str, str | None], str | None] = {}  # -> problem, or None
        table = []
        for i, r in enumerate(self.routes):
            if r.port is not None and r.port not in self.ports:
                issues.append(_issue(("routes", i, "port"), f"no port {r.port!r}; the "
                                     f"router's ports: {', '.join(names)}", r.port))
            elif r.via is not None:
                k = (r.via, r.port)
                if k not in gateways:
                    gateways[k] = self._gateway_problem(ipaddress.IPv4Address(r.via),
                                                        r.port, nets)
                if gateways[k]:
                    issues.append(_issue(("routes", i, "via"), gateways[k], r.via))
            net = _fast_ip(r.prefix)  # canonical by now
            if net in reserved:
                issues.append(_issue(("routes", i, "prefix"), f"{r.prefix} is "
                                     f"{reserved[net]}", r.prefix))
            elif net in seen:
                issues.append(_issue(("routes", i, "prefix"), f"duplicate route for "
                                     f"{r.prefix} (also routes[{seen[net]}])", r.prefix))
            else:
                seen[net] = i
            table.append((net[0], net[1], 0 if r.via is None else _fast_ip(r.via)[0],
                          r.port))
        if len(self.routes) + len(self.ports) > self.max_routes:
            issues.append(_issue(("routes",), f"{len(self.routes)} routes plus "
                                 f"{len(self.ports)} connected subnets exceed max_routes "
                                 f"({self.max_routes})", len(self.routes)))
        if issues:
            raise ValidationError.from_exception_data("RouterConfig", issues)
        self._table = table
        return self

    def route_table(self) -> list[tuple[int, int, int, str | None]]:
        """(prefix, length, gateway or 0, port or None) of every route, as integers."""
        return self._table

    def _gateway_problem(self, via: ipaddress.IPv4Address, port: str | None,
                         nets: dict[str, ipaddress.IPv4Network]) -> str | None:
        if port is not None:
            if via not in nets[port]:
                return f"next hop {via} is not in port {port}'s subnet {nets[port]}"
            net = nets[port]
        else:
            where = [n for n, net in nets.items() if via in net]
            if not where:
                connected = ", ".join(f"{n} {net}" for n, net in nets.items())
                return f"next hop {via} is not in a connected subnet ({connected})"
            net = nets[where[0]]
        for n, p in self.ports.items():
            if p.interface.ip == via:
                return f"next hop {via} is the address of port {n}"
        if net.prefixlen <= 30 and via in (net.network_address, net.broadcast_address):
            return f"next hop {via} is the network or broadcast address of {net}"
        return None

    def gateway_port(self, via: int) -> int:
        """Index of the port whose subnet holds ``via`` (validated to exist)."""
        for i, p in enumerate(self.ports.values()):
            net = p.interface.network
            if via & int(net.netmask) == int(net.network_address):
                return i
        raise ValueError(f"no connected subnet holds {ipaddress.IPv4Address(via)}")

    def port_names(self) -> list[str]:
        return list(self.ports)


# -- state ---------------------------------------------------------------------------

class RouterState(DeviceState):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__(len(EVENTS))
        q = config.arp_queue
        self.arp = HashTable(key_words=1, value_words=2, max_entries=config.arp_cache_size)
        self.shared_tables["arp"] = self.arp
        # Next hops with held packets (at most one per packet) and next hops ARPed for
        # while the queue was full (expiring after ARP_RETRY).
        self.pending = HashTable(key_words=1, value_words=2, max_entries=2 * q)
        self.hq_meta = np.zeros((q, L.NFIELDS), np.int64)
        self.hq_key = np.zeros(q, np.int64)
        self.hq_time = np.zeros(q, np.float64)
        self.misc = np.zeros(5, np.int64)
        self.tokens = np.array([config.icmp_rate, 0.0], np.float64)  # tokens, last refill
        self.key = np.zeros(1, np.int64)  # kernel scratch
        a, p = self.arp, self.pending
        self.arrays = (a.keys, a.vals, a.state, a.bucket, a.expires, a.info,
                       p.keys, p.vals, p.state, p.bucket, p.expires, p.info,
                       self.hq_meta, self.hq_key, self.hq_time, self.misc, self.tokens)

    def held_slots(self) -> int:
        """Packet slots the router keeps right now (held for ARP)."""
        return int(self.misc[M_HQN])


# -- kernels ---------------------------------------------------------------------------

@kernel
def _martian(a):
    """0/8, 127/8: never a valid source or destination."""
    top = a >> 24
    return top == 0 or top == 127


@kernel
def _local_in(data, free, top, meta, i, n, total, headroom, port_ip, port_mac, tbl24, tbl8,
              nh_port, nh_gw, nh_kind, rate, st, events, key, now):
    """An IPv4 packet to one of the router's addresses."""
    row = meta[i]
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    if nh_kind[lpm_lookup(tbl24, tbl8, rd32(pkt, l3 + 12))] == NH_BCAST:
        row[L.VERDICT] = drop_code(D_MARTIAN_SRC)  # nothing answers a broadcast source
        return total
    proto = row[L.PROTO]
    whole = (row[L.PFLAGS] & L.F_FRAG) == 0
    if whole and proto == L.PROTO_ICMP and (row[L.PFLAGS] & L.F_L4_OK) \
            and i64(pkt[row[L.L4_OFF]]) == 8 and i64(pkt[row[L.L4_OFF] + 1]) == 0:
        l4 = row[L.L4_OFF]
        ilen = l3 + rd16(pkt, l3 + 2) - l4
        if csum_fold(csum_add(pkt, l4, ilen, 0)) != 0:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            return total
        src_mac = rd48(pkt, 6)
        wr48(pkt, 0, src_mac)
        wr48(pkt, 6, port_mac[row[L.IN_PORT]])
        a = rd32(pkt, l3 + 12)
        wr32(pkt, l3 + 12, rd32(pkt, l3 + 16))
        wr32(pkt, l3 + 16, a)
        pkt[l3 + 8] = 64
        wr16(pkt, l3 + 10, ipv4_header_checksum(pkt, l3))
        old = rd16(pkt, l4)
        pkt[l4] = 0
        wr16(pkt, l4 + 2, csum_update16(rd16(pkt, l4 + 2), old, rd16(pkt, l4)))
        row[L.VERDICT] = row[L.IN_PORT]
        row[L.NOTE] = N_ECHO
        events[C_ECHO] += 1
        return total
    row[L.NOTE] = N_NOT_SERVED
    if whole and proto == L.PROTO_UDP:
        total = _icmp_error(data, free, top, meta, i, n, total, headroom, 3, 3, port_ip,
                            port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st, events,
                            key, now)
    elif whole and proto != L.PROTO_TCP and proto != L.PROTO_ICMP:
        total = _icmp_error(data, free, top, meta, i, n, total, headroom, 3, 2, port_ip,
                            port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st, events,
                            key, now)
    row[L.VERDICT] = drop_code(D_NOT_SERVED)
    return total


@kernel
def router_kernel(data, free, top, meta, n, headroom, port_ip, port_mask, port_bcast,
                  port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, params, st, events, key,
                  nhs, now):
    """Decide rows [0, n); append generated rows. Returns the new row count.

    ``nhs``: scratch, at least ``n`` entries (each row's next-hop number)."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    arp_timeout = params[P_ARP_TIMEOUT]
    rate = params[P_ICMP_RATE]
    misc[M_EPOCH] += 1
    expired_before = ainfo[I_EXPIRED]
    # Route lookups first, in a loop of their own: with 100k routes tbl24 reads miss
    # the cache, and a short loop keeps many of those misses in flight at once.
    for i in range(n):
        row = meta[i]
        nhs[i] = 0
        if row[L.ETYPE] == L.ETH_IPV4 and row[L.PERR] == L.E_OK:
            nhs[i] = lpm_lookup(tbl24, tbl8, rd32(data[row[L.SLOT]],
                                                  row[L.START] + row[L.L3_OFF] + 16))
    total = n
    for i in range(n):
        row = meta[i]
        row[L.NOTE] = 0
        if row[L.PERR] == L.E_RUNT:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        inp = row[L.IN_PORT]
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + row[L.LEN]]
        dmac = rd48(pkt, 0)
        if dmac != port_mac[inp] and dmac != L.BCAST_MAC:
            row[L.VERDICT] = drop_code(D_NOT_FOR_ME)
            row[L.NOTE] = N_NOT_FOR_ME
            continue
        etype = row[L.ETYPE]
        if row[L.TAGS] > 0 or row[L.PERR] == L.E_VLAN_TRUNC or row[L.PERR] == L.E_VLAN_MANY \
                or (etype != L.ETH_IPV4 and etype != L.ETH_ARP):
            row[L.VERDICT] = drop_code(D_UNSUPPORTED)
            continue
        if row[L.PERR] != L.E_OK:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        if etype == L.ETH_ARP:
            total = _arp_in(data, meta, i, total, port_ip, port_mask, port_bcast, port_mac,
                            arp_timeout, st, events, key, now)
            continue
        if row[L.PFLAGS] & L.F_IP_CSUM_BAD:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        l3 = row[L.L3_OFF]
        src = rd32(pkt, l3 + 12)
        dst = rd32(pkt, l3 + 16)
        if dmac == L.BCAST_MAC or dst == M32 or (dst >> 28) == 14:
            row[L.VERDICT] = drop_code(D_BROADCAST)
            continue
        if _martian(src) or (src >> 29) == 7:
            row[L.VERDICT] = drop_code(D_MARTIAN_SRC)
            continue
        if _martian(dst) or (dst >> 28) == 15:
            row[L.VERDICT] = drop_code(D_MARTIAN_DST)
            continue
        nh = nhs[i]
        kind = nh_kind[nh]
        if kind == NH_LOCAL:
            total = _local_in(data, free, top, meta, i, n, total, headroom, port_ip, port_mac,
                              tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st, events, key,
                              now)
            continue
        if kind == NH_BCAST:
            row[L.VERDICT] = drop_code(D_BROADCAST)
            continue
        if (src >> 16) == 0xA9FE:
            row[L.VERDICT] = drop_code(D_MARTIAN_SRC)
            continue
        if (dst >> 16) == 0xA9FE:
            row[L.VERDICT] = drop_code(D_MARTIAN_DST)
            continue
        ttl = i64(pkt[l3 + 8])
        if ttl <= 1:
            row[L.NOTE] = N_TTL
            total = _icmp_error(data, free, top, meta, i, n, total, headroom, 11, 0, port_ip,
                                port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st,
                                events, key, now)
            row[L.VERDICT] = drop_code(D_TTL)
            continue
        if kind == NH_NONE:
            row[L.NOTE] = N_NO_ROUTE
            total = _icmp_error(data, free, top, meta, i, n, total, headroom, 3, 0, port_ip,
                                port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st,
                                events, key, now)
            row[L.VERDICT] = drop_code(D_NO_ROUTE)
            continue
        old = rd16(pkt, l3 + 8)
        new = old - 0x100
        wr16(pkt, l3 + 8, new)
        wr16(pkt, l3 + 10, csum_update16(rd16(pkt, l3 + 10), old, new))
        gw = nh_gw[nh]
        p = nh_port[nh]
        target = gw if gw != 0 else dst
        note = N_VIA if gw != 0 else N_DIRECT
        # The common case inline: next hop known, nothing held or released this batch.
        # (A call to _send passes every state array by value on the stack: ~0.5 KB.)
        if misc[M_HQN] == 0 and misc[M_REL_EPOCH] != misc[M_EPOCH]:
            key[0] = (p << 32) | target
            e = tbl_lookup(akeys, astate, aexp, ainfo, key, now)
            if e >= 0:
                wr48(pkt, 0, avals[e, 0])
                wr48(pkt, 6, port_mac[p])
                row[L.VERDICT] = p
                row[L.NOTE] = note
                continue
        total = _send(data, free, top, meta, i, n, total, headroom, p, target, note, port_ip,
                      port_mac, st, events, key, now)
    if misc[M_HQN] > 0:
        total = _scan(data, free, top, meta, total, headroom, port_ip, port_mac,
                      params[P_ARP_HOLD], st, events, key, now)
    tbl_sweep(astate, aexp, ainfo, now, SWEEP_SLOTS)
    events[C_ARP_EXPIRED] += ainfo[I_EXPIRED] - expired_before
    # tables whose tombstones pile up: tell process() to rebuild them (checked here
    # because two Python calls per batch cost ~1 us)
    misc[M_REBUILD] = tbl_needs_rebuild(astate, ainfo) or tbl_needs_rebuild(pstate, pinfo)
    return total


# -- device ----------------------------------------------------------------------------

class Router(Device):
    type_name = "router"
    config_model = RouterConfig
    drop_reasons = DROPS
    counters = EVENTS
    notes = NOTES
    # Per input row: an ICMP error, an ARP request for its next hop, a same-batch
    # release; per batch: every held packet released or timed out plus an ARP request
    # per next hop. emit_reserve is set per instance from arp_queue (64 by default).
    max_emit = 3
    emit_reserve = 3 * 64 + 8
    ticks = True

    def __init__(self, name: str, config: RouterConfig) -> None:
        super().__init__(name, config)
        self.emit_reserve = 3 * config.arp_queue + 8
        itfs = [p.interface for p in config.ports.values()]
        self.port_ip = np.array([int(t.ip) for t in itfs], np.int64)
        self.port_mask = np.array([int(t.network.netmask) for t in itfs], np.int64)
        self.port_bcast = np.array([int(t.network.broadcast_address)
                                    if t.network.prefixlen <= 30 else -1 for t in itfs],
                                   np.int64)
        self.port_mac = np.array([parse_mac(p.mac) if p.mac else derive_mac(name, n)
                                  for n, p in config.ports.items()], np.int64)
        # Next hops: 0 = no route; then per port connected/local/broadcast; then gateways.
        kinds, ports, gws = [NH_NONE], [0], [0]
        index: dict[tuple[int, int, int], int] = {}

        def nexthop(kind: int, port: int, gw: int) -> int:
            k = (kind, port, gw)
            if k not in index:
                index[k] = len(kinds)
                kinds.append(kind)
                ports.append(port)
                gws.append(gw)
            return index[k]

        pfx, lens, nhs = [], [], []
        for p, t in enumerate(itfs):
            pfx += [int(t.network.network_address), int(t.ip)]
            lens += [t.network.prefixlen, 32]
            nhs += [nexthop(NH_FWD, p, 0), nexthop(NH_LOCAL, p, 0)]
            if t.network.prefixlen <= 30:
                pfx.append(int(t.network.broadcast_address))
                lens.append(32)
                nhs.append(nexthop(NH_BCAST, p, 0))
        via_port: dict[int, int] = {}
        for net, ln, gw, port in config.route_table():
            if port is not None:
                p = self.port_index[port]
            elif gw in via_port:
                p = via_port[gw]
            else:
                p = via_port[gw] = config.gateway_port(gw)
            pfx.append(net)
            lens.append(ln)
            nhs.append(nexthop(NH_FWD, p, gw))
        self.lpm = Lpm(pfx, lens, nhs)
        self.nh_kind = np.array(kinds, np.int64)
        self.nh_port = np.array(ports, np.int64)
        self.nh_gw = np.array(gws, np.int64)
        self.params = np.array([config.arp_timeout, config.arp_hold, config.icmp_rate],
                               np.float64)

    def new_state(self) -> RouterState:
        return RouterState(self.config)

    def port_mac_str(self, port: str) -> str:
        return mac_str(int(self.port_mac[self.port_index[port]]))

    def describe(self) -> str:
        ports = ", ".join(f"{n} {p.ip}" for n, p in self.config.ports.items())
        return f"{self.name} ({self.type_name}: {ports}; {len(self.config.routes)} routes)"

    def process(self, batch, state: RouterState, now: float) -> None:
        pool = batch.pool
        batch.n = router_kernel(pool.data, pool.free, pool.top, batch.meta, batch.n,
                                pool.headroom, self.port_ip, self.port_mask, self.port_bcast,
                                self.port_mac, self.lpm.tbl24, self.lpm.tbl8, self.nh_port,
                                self.nh_gw, self.nh_kind, self.params, state.arrays,
                                state.events, state.key, state.scratch(batch.n), float(now))
        if state.misc[M_REBUILD]:
            if state.arp.needs_rebuild():
                state.events[C_ARP_EXPIRED] += state.arp.rebuild(now)
            if state.pending.needs_rebuild():
                state.pending.rebuild(now)
