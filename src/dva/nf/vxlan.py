"""``vxlan``: a VXLAN tunnel endpoint (VTEP, RFC 7348) joining an L2 segment to remote ones.

Ports (fixed): ``overlay`` -- the Ethernet segment (link it to a switch, or attach
it to hosts), and ``underlay`` -- the IP network the tunnel runs over.

Config::

    type: vxlan
    vni: 100                       # 0..16777215
    local: 192.0.2.1/24            # the VTEP's underlay address, with its prefix length
    mac: 02:00:00:00:0a:01         # optional: derived like a router port's (02 + sha1)
    gateway: 192.0.2.254           # optional: next hop for remote VTEPs outside the subnet
    remotes: [192.0.2.2, 198.51.100.7]    # the flood list (head-end replication)
    static: {"02:00:00:00:00:09": 192.0.2.2}   # MAC -> VTEP entries that never age
    learn: true                    # inner source MAC -> VTEP from decapsulated frames
    aging: 300                     # seconds a learned MAC lives without traffic
    mac_table_size: 8192           # learned MACs at most
    arp_timeout: 300               # seconds a next hop's MAC is kept
    mtu: 1500                      # underlay IP MTU: a larger encapsulated packet is dropped
    port: 4789                     # UDP destination port (IANA: 4789)
    inner_vlan: false              # true: carry VLAN-tagged inner frames (RFC 7348 6.1)

Rejected, each at its path in the file: bad addresses or MACs, a ``local`` that is its
subnet's network or broadcast address, a ``gateway`` outside the local subnet (or the
local, network or broadcast address), a remote or static VTEP that is the local
address, or outside the subnet while no gateway is set, a remote listed twice, a
static MAC that is not unicast, more than ``MAX_REMOTES`` remotes or ``MAX_VTEPS``
VTEPs in all, no remote and no static entry at all.

Known VTEPs are the remotes plus the static entries' VTEPs.

Encapsulation (a frame from ``overlay``):

* Dropped first: a runt (``runt``), a VLAN-tagged frame unless ``inner_vlan``
  (``inner_vlan``: RFC 7348 6.1 says a VTEP SHOULD NOT carry inner tags), a multicast
  or zero source MAC (``invalid_src_mac``), a frame whose encapsulation -- an IP
  packet of the frame's length + 36 bytes -- exceeds ``mtu`` (``too_big``: counted,
  never truncated or fragmented; RFC 7348 4.3), a frame with fewer than 50 bytes of
  headroom before it in its slot (``no_headroom``; pool slots leave 128).
* Destination: a unicast MAC in ``static``, else one learned, goes to that VTEP only.
  Broadcast, multicast and unknown unicast are head-end replicated to every remote in
  ``remotes`` (none: ``no_remote``): the frame itself is encapsulated for the first
  remote whose next hop is resolved, and a copy of the encapsulated packet in a new
  pool slot (outer destinations, IP id and checksum, UDP source port rewritten) goes
  to each other one
  (``max_emit`` = remotes - 1). A remote whose next hop is unresolved gets no copy
  (``flood_unresolved``); if none is resolved the frame is dropped ``unresolved``.
* The outer headers go into the slot's headroom in front of the frame (no copy):
  Ethernet from the VTEP's MAC to the next hop's (the remote itself inside the local
  subnet, else ``gateway``), IPv4 from ``local`` to the remote with TTL 64, TOS 0,
  DF set (the underlay must carry ``mtu``; VTEPs never fragment), an IP id counter
  and a correct header checksum; UDP to ``port`` with checksum 0 (allowed over IPv4)
  from a source port in 49152-65535 derived from the inner frame's flow (RFC 7348 5:
  one inner flow, one underlay path; both directions of a flow hash alike): its low
  bits (12 with 4096 flow buckets) are solved so that the outer packet's bucket hash
  equals the inner frame's bucket (the bucket hash is linear in the ports, see
  :mod:`dva.packet.parse`), the others come from the inner flow hash. A receiving dva
  appliance with the same tenant id and bucket count (up to 16384) thus dispatches
  the packet to the worker owning the inner flow's bucket, where stateful devices
  after the decapsulation keep its state. VXLAN: flags 0x08 (I), the VNI, reserved
  bits 0.
* The rewritten row describes the outer frame as the parser would (offsets, flags,
  hash, bucket: set directly, every value being known); flood copies are parsed by
  the engine like any generated row.

Decapsulation (a frame from ``underlay``), in this order:

* L2: to the VTEP's MAC or broadcast, else ``not_for_me``; VLAN-tagged and ethertypes
  other than IPv4 and ARP ``unsupported``; parse errors ``malformed``.
* ARP: a request for ``local`` is answered (the frame becomes the reply); an ARP
  reply to it is ``arp_consumed``; anything else ``arp_not_for_me``. Only next hops
  (in-subnet VTEPs and the gateway) are kept: one asking for ``local`` or answering it
  is learned, one ARPing for others only refreshes an existing entry (RFC 826 merge).
* IPv4: bad header checksum ``bad_checksum``; not to ``local`` (or in an L2
  broadcast) ``not_for_me``; a fragment ``fragment`` (RFC 7348 4.3: the destination
  VTEP may discard them; reassembly is not done); UDP to ``port`` is VXLAN; an ICMP
  echo request is answered (``bad_checksum`` if its checksum is wrong); everything
  else ``not_served``.
* VXLAN: a UDP length below 16 is ``malformed``; a non-zero UDP checksum is verified
  (``bad_checksum``; zero is accepted, RFC 7348 5); the I flag must be set
  (``bad_vxlan``; the reserved bits are ignored); the VNI must be ``vni``
  (``unknown_vni``); the outer source must be a known VTEP (``unknown_vtep``: the
  tunnel does not take frames from anyone); the inner frame (the UDP payload after
  the 8-byte VXLAN header) must hold an Ethernet header (``runt``), have a unicast
  source MAC (``invalid_src_mac``) and no VLAN tag unless ``inner_vlan``
  (``inner_vlan``). With ``learn`` its source MAC is learned behind the outer source
  address (static MACs are never overridden). The outer headers are stripped by
  moving ``START`` (no copy) and the row is parsed afresh as the inner frame (offsets,
  flow hash, bucket: what the next device sees), which leaves by ``overlay``.

Next-hop resolution: there is no hold queue. A packet whose next hop's MAC is unknown
is dropped ``unresolved`` and an ARP request for that next hop goes out (at most one
per ``ARP_RETRY`` second per next hop). The device ticks (``ticks = True``): on every
engine tick (about 10 per second when live) it ARPs for every next hop that is
unknown or expires within ``min(arp_timeout / 4, 30)`` seconds (same spacing), so
traffic normally finds them resolved; offline runs have no ticks, only the requests
that traffic triggers. ``emit_reserve`` = one ARP request per next hop (+2).

State (:class:`VxlanState`): ``macs`` (shared, replicated): inner MAC -> VTEP
address, expiring ``aging`` after it was last seen, bounded by ``mac_table_size``
(full: ``mac_table_full``, frames to it flood); ``neighbors`` (shared): next-hop
address -> MAC, expiring ``arp_timeout`` after it was learned or refreshed. Local to
the worker: when each next hop was last ARPed for, a per-batch cache of next-hop MACs,
the IP id counter. No flow state: nothing moves with flow buckets.

Limits not hidden: an IPv4 underlay only; one VNI per device (one device per VNI);
head-end replication only (no multicast groups on the underlay); fragments to the
VTEP are dropped, not reassembled; the IP id counter is per worker (ids may repeat
across workers: with DF set, RFC 6864 allows it); the bucket-keeping source port
needs the receiver's tenant id and bucket count (up to 16384) to be the same.

Drop reasons: ``DROPS``; counters: ``EVENTS``; trace notes: ``NOTES`` (in
:mod:`dva.nf.vxlan_kernels`, with the kernels).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from dva.nf.base import Device, DeviceConfig, DeviceState, host_address
from dva.nf.router import derive_mac, interface_address, mac_str, parse_mac
from dva.nf.table import HashTable
from dva.nf.vxlan_kernels import (
    C_AGED,
    DROPS,
    EVENTS,
    F_REFRESH,
    G_AH,
    G_BCAST,
    G_LEARN,
    G_LOCAL,
    G_M,
    G_MAC,
    G_MINV,
    G_MTU,
    G_NF,
    G_NN,
    G_NS,
    G_NV,
    G_NVH,
    G_PORT,
    G_VLAN_OK,
    G_VNI,
    M_REBUILD,
    NCFG,
    NOTES,
    vtep_slot,
    vxlan_kernel,
)
from dva.packet.parse import addr_hash, endpoint_term

__all__ = ["DROPS", "EVENTS", "NOTES", "MAX_REMOTES", "MAX_VTEPS", "Vxlan", "VxlanConfig",
           "VxlanState"]

MAX_REMOTES = 64  # flood fan-out: each flooded frame becomes up to this many packets
MAX_VTEPS = 1024  # remotes + static VTEPs


def _host(v: str) -> str:
    """A unicast IPv4 host address, canonical."""
    return str(ipaddress.IPv4Address(host_address(v)))


def _static_mac(v: str) -> str:
    try:
        return mac_str(parse_mac(v))
    except ValueError as e:
        raise ValueError(str(e).replace("a port MAC", "a static MAC")) from None


Host = Annotated[str, AfterValidator(_host)]
StaticMac = Annotated[str, AfterValidator(_static_mac)]


def _issue(loc: tuple, msg: str, value) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("vxlan_config", "{msg}", {"msg": msg}),
                            loc=loc, input=value)


class VxlanConfig(DeviceConfig):
    type: Literal["vxlan"]
    vni: int = Field(ge=0, le=0xFFFFFF)
    local: str
    mac: str | None = None
    gateway: Host | None = None
    remotes: list[Host] = []
    static: dict[StaticMac, Host] = {}
    learn: bool = True
    aging: float = Field(default=300.0, gt=0, le=1_000_000)
    mac_table_size: int = Field(default=8192, ge=1, le=1_000_000)
    arp_timeout: float = Field(default=300.0, gt=0, le=1_000_000)
    mtu: int = Field(default=1500, ge=68, le=65535)
    port: int = Field(default=4789, ge=1, le=65535)
    inner_vlan: bool = False

    @field_validator("local")
    @classmethod
    def _local(cls, v: str) -> str:
        return interface_address(v, "VTEP address", "192.0.2.1/24")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return None if v is None else mac_str(parse_mac(v))

    @field_validator("remotes")
    @classmethod
    def _remotes(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_REMOTES:
            raise ValueError(f"at most {MAX_REMOTES} remotes (each flooded frame is sent "
                             f"to every one)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VxlanConfig:
        issues: list[InitErrorDetails] = []
        itf = ipaddress.IPv4Interface(self.local)
        net = itf.network
        edge = (net.network_address, net.broadcast_address) if net.prefixlen <= 30 else ()

        def problem(a: str) -> str | None:
            ip = ipaddress.IPv4Address(a)
            if ip == itf.ip:
                return f"{a} is the local VTEP address"
            if ip in edge:
                return f"{a} is the network or broadcast address of {net}"
            if ip not in net and self.gateway is None:
                return f"{a} is outside the local subnet {net} and no gateway is set"
            return None

        if self.gateway is not None:
            gw = ipaddress.IPv4Address(self.gateway)
            if gw not in net:
                issues.append(_issue(("gateway",), f"gateway {gw} is not in the local "
                                     f"subnet {net}", self.gateway))
            elif gw == itf.ip or gw in edge:
                issues.append(_issue(("gateway",), f"gateway {gw} is the local, network or "
                                     f"broadcast address", self.gateway))
        seen: dict[str, int] = {}
        for i, r in enumerate(self.remotes):
            why = problem(r)
            if why:
                issues.append(_issue(("remotes", i), why, r))
            elif r in seen:
                issues.append(_issue(("remotes", i), f"{r} is listed twice (also "
                                     f"remotes[{seen[r]}])", r))
            seen.setdefault(r, i)
        for m, r in self.static.items():
            why = problem(r)
            if why:
                issues.append(_issue(("static", m), why, r))
        if not self.remotes and not self.static:
            issues.append(_issue(("remotes",), "a vxlan needs at least one remote VTEP "
                                 "(remotes, or static entries)", self.remotes))
        if len(set(self.remotes) | set(self.static.values())) > MAX_VTEPS:
            issues.append(_issue(("static",), f"more than {MAX_VTEPS} VTEPs", len(self.static)))
        if issues:
            raise ValidationError.from_exception_data("VxlanConfig", issues)
        return self

    def port_names(self) -> list[str]:
        return ["overlay", "underlay"]


class VxlanState(DeviceState):
    def __init__(self, config: VxlanConfig, n_nexthops: int) -> None:
        super().__init__(len(EVENTS))
        self.macs = HashTable(key_words=1, value_words=1, max_entries=config.mac_table_size)
        self.neighbors = HashTable(key_words=1, value_words=1, max_entries=max(n_nexthops, 1))
        self.shared_tables["macs"] = self.macs
        self.shared_tables["neighbors"] = self.neighbors
        nn = max(n_nexthops, 1)
        self.asked = np.full(nn, -1e18, np.float64)  # when each next hop was last ARPed
        self.nhc = np.zeros((nn, 2), np.int64)  # per-batch cache: MAC, batch number
        self.nhc[:, 1] = -1
        self.misc = np.zeros(3, np.int64)  # IP id counter, batch number, rebuild flag
        self.key = np.zeros(1, np.int64)  # kernel scratch
        # The kernel's arguments after the device's (the tables' records whole: see
        # vxlan_kernel).
        self.args = (*_records(self.macs), *_records(self.neighbors), self.asked, self.nhc,
                     self.misc, self.key, self.events)


def _records(t: HashTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A table's records as int64 and float64, its control bytes and its info;
    checked to hold the columns the kernel takes (expiry, key, bucket, value)."""
    r = t.records
    base = r.__array_interface__["data"][0]

    def at(a: np.ndarray) -> int:
        return (a.__array_interface__["data"][0] - base) // 8

    if not (r.flags.c_contiguous and (at(t.expires), at(t.keys), at(t.bucket),
                                      at(t.vals)) == (0, 1, 2, 3)):
        raise AssertionError("HashTable records are not laid out as vxlan_kernel expects")
    return r, r.view(np.float64), t.state, t.info


def _words(a: int) -> int:
    return (a >> 16) + (a & 0xFFFF)


class Vxlan(Device):
    type_name = "vxlan"
    config_model = VxlanConfig
    drop_reasons = DROPS
    counters = EVENTS
    notes = NOTES
    ticks = True

    def __init__(self, name: str, config: VxlanConfig) -> None:
        super().__init__(name, config)
        itf = ipaddress.IPv4Interface(config.local)
        net = itf.network
        local = int(itf.ip)
        self.mac = parse_mac(config.mac) if config.mac else derive_mac(name, "underlay")
        gw = int(ipaddress.IPv4Address(config.gateway)) if config.gateway else 0
        ip_of = lambda a: int(ipaddress.IPv4Address(a))  # noqa: E731
        vteps = sorted({ip_of(a) for a in config.remotes} | {ip_of(a) for a in
                                                            config.static.values()})

        def nexthop(a: int) -> int:
            return a if ipaddress.IPv4Address(a) in net else gw

        nhs = sorted({nexthop(a) for a in vteps})
        static = sorted((int(m.replace(":", ""), 16), vteps.index(ip_of(a)))
                        for m, a in config.static.items())
        cfg = [0] * NCFG
        cfg[G_VNI] = config.vni
        cfg[G_PORT] = config.port
        cfg[G_LOCAL] = local
        cfg[G_BCAST] = int(net.broadcast_address) if net.prefixlen <= 30 else -1
        cfg[G_MAC] = self.mac
        cfg[G_MTU] = config.mtu
        cfg[G_LEARN] = int(config.learn)
        cfg[G_VLAN_OK] = int(config.inner_vlan)
        cfg[G_NV] = len(vteps)
        cfg[G_NF] = len(config.remotes)
        cfg[G_NN] = len(nhs)
        cfg[G_NS] = len(static)
        # The bucket hash of the outer packet (parse.py) is A(local) + sport * M(local)
        # + E(remote, port) + T(tenant, UDP): the kernel solves it for the source port
        # that keeps the inner frame's bucket.
        ah = int(addr_hash(local, 0, 0, 0))
        cfg[G_AH] = ah
        cfg[G_M] = (ah >> 15) | 1
        cfg[G_MINV] = pow(cfg[G_M], -1, 1 << 32)
        term = [int(endpoint_term(int(addr_hash(a, 0, 0, 0)), config.port)) for a in vteps]
        # Unfolded sum of the outer IPv4 header's constant words (version/IHL, DF, TTL
        # and protocol, both addresses): the checksum adds total length and id.
        csum = [0x4500 + 0x4000 + 0x4011 + _words(local) + _words(a) for a in vteps]
        nvh = 8
        while nvh < 4 * len(vteps):
            nvh *= 2
        slots = [0] * nvh
        for v, a in enumerate(vteps):
            h = int(vtep_slot(a, nvh))
            while slots[h]:
                h = (h + 1) % nvh
            slots[h] = v + 1
        cfg[G_NVH] = nvh
        self.dv = np.array(
            cfg + vteps + [nhs.index(nexthop(a)) for a in vteps] + csum + term
            + [vteps.index(ip_of(a)) for a in config.remotes] + nhs
            + [m for m, _ in static] + [v for _, v in static] + slots, np.int64)
        self.vteps = vteps
        self.nexthops = nhs
        self.fparams = np.array([config.aging, config.arp_timeout,
                                 min(config.arp_timeout / 4, 30.0)], np.float64)
        assert F_REFRESH == 2
        self.max_emit = max(len(config.remotes) - 1, 0)
        self.emit_reserve = len(nhs) + 2

    @property
    def vtep_mac(self) -> str:
        return mac_str(self.mac)

    def new_state(self) -> VxlanState:
        return VxlanState(self.config, len(self.nexthops))

    def describe(self) -> str:
        c = self.config
        return (f"{self.name} ({self.type_name}: VNI {c.vni}, {c.local}, "
                f"{len(c.remotes)} remotes, {len(c.static)} static)")

    def process(self, batch, state: VxlanState, now: float) -> None:
        pool = batch.pool
        batch.n = vxlan_kernel(pool.data, pool.free, pool.top, batch.meta, batch.n,
                               pool.headroom, self.dv, self.fparams, *state.args, float(now),
                               state.bucket_mask)
        if state.misc[M_REBUILD]:
            state.events[C_AGED] += state.macs.rebuild(now)
            state.neighbors.rebuild(now)
