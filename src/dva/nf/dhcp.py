"""``dhcp``: a DHCP server (RFC 2131, options RFC 2132) for the subnet of its one port.

Ports: the one name in ``ports`` (a mapping name -> address, like a router port); its
address is the server identifier (option 54), its prefix gives the subnet mask.

Config::

    type: dhcp
    ports: {lan: {ip: 10.0.0.2/24}}    # mac optional: 02 + 5 bytes of sha1("dhcp.lan")
    pool:
      start: 10.0.0.100                # the dynamic range, inclusive (65536 at most)
      end: 10.0.0.199
      router: 10.0.0.1                 # option 3 (optional)
      dns: [10.0.0.1]                  # option 6 (optional, 8 at most)
      domain: lab.example              # option 15 (optional)
      lease: 3600                      # seconds (option 51)
      max_lease: 3600                  # a client may ask for up to this (default: lease)
      renew: 1800                      # T1 (option 58; default lease / 2)
      rebind: 3150                     # T2 (option 59; default lease * 7 / 8)
    reservations:                      # static addresses by MAC (in or out of the range)
      - {mac: 02:00:00:00:00:10, ip: 10.0.0.10}
    offer_hold: 60                     # seconds an offered address is kept for the client
    decline_hold: 600                  # seconds a declined address is not given out

Rejected, each at its path: a pool range, router, reservation or DNS server that is the
subnet's network or broadcast address or the server's own address; a range, router or
reservation outside the subnet; a range, reservation or the router on a DNS server or
the router; a MAC or an address reserved twice; ``renew < rebind < lease <= max_lease``
not holding; a subnet smaller than /30.

Behaviour (drop reasons in ``DROPS``, in the order they are checked):

* L2/L3: a frame must be addressed to the port's MAC or be a broadcast
  (``not_for_me``); VLAN-tagged frames and ethertypes other than IPv4 and ARP are
  ``unsupported``; any parse error is ``malformed``. ARP: a request for the server's
  address is answered in place (clients unicast renewals to the server); every other
  ARP is ``arp_not_for_me`` (nothing is learned: replies go to addresses the requests
  carry). IPv4: bad header checksum ``bad_checksum``; to an address other than the
  server's, 255.255.255.255 or the subnet broadcast ``not_for_me``; fragments
  ``malformed``; not UDP to port 67 ``not_dhcp``; a wrong UDP checksum
  ``bad_checksum``.
* BOOTP/DHCP (:mod:`dva.nf.dhcp_wire`): shorter than 240 bytes ``bootp_truncated``;
  op not BOOTREQUEST ``not_request``; not Ethernet, or chaddr not unicast
  ``bad_hardware``; no magic cookie ``bad_cookie``; options cut short or of a wrong
  length ``bad_option`` (option overload, 52, honoured); no message type
  ``no_message_type``; giaddr set ``relayed`` (no relay agent support: the server
  serves the link of its port).
* Clients are told apart by their client identifier (option 61) if they send one,
  else by chaddr; reservations match chaddr.
* DHCPDISCOVER: an offer of the client's current address, else its reserved one, else
  the one it asks for (option 50) if that may be its, else a free pool address found
  from a hash of the client (the same client gets the same address back while it is
  free); the address is held for the client ``offer_hold`` seconds. No address:
  silence, ``pool_exhausted``.
* DHCPREQUEST: SELECTING, INIT-REBOOT, RENEWING and REBINDING as RFC 2131 4.3.2 says
  (:func:`dva.nf.dhcp_lease.on_request`): ACK binds the lease (``lease`` or what the
  client asks within ``max_lease``), NAK on a wrong address or subnet, silence
  (``other_server``) when the server identifier is another server's (our offer to
  that client is withdrawn), silence (``unknown_client``) for INIT-REBOOT and
  REBINDING of a client without a lease here. ``bad_request``: no requested address
  where one is needed.
* DHCPDECLINE: the client's address is marked unusable for ``decline_hold`` seconds;
  DHCPRELEASE: the client's lease ends and its address is free. Both ``consumed``
  (the protocol has no reply).
* DHCPINFORM (with ciaddr): ACK with the configuration, no address and no lease times.
  Other message types: ``unsupported_message``.
* Replies (:func:`dva.nf.dhcp_wire.write_reply`) leave by the port they came in,
  written over the request's frame, addressed per RFC 2131 4.1: NAK to
  255.255.255.255; a request with ciaddr to ciaddr (unicast to the frame's source
  MAC); with the broadcast flag to 255.255.255.255; else to yiaddr at chaddr.
  Options: 53, 54, lease time 51 with T1 58 and T2 59, mask 1, broadcast 28, router
  3, DNS 6, domain 15, and the client identifier echoed (RFC 6842); BOOTP padded to
  300 bytes. No ICMP probe before an offer (a DECLINE handles conflicts).

State (:class:`DhcpState`): the ``leases`` and ``addrs`` tables (shared state, see
:mod:`dva.nf.dhcp_lease`), bounded by the number of addresses the server can give;
entries expire with ``now`` (an expired lease's address is free again). The device
sets ``persist``: the runtime saves the shared state to a file and loads it at start
(:mod:`dva.worker.persist`), so leases survive restarts. ``misc``: a change counter
(the runtime saves only after changes) and the IP id of replies.

Counters: ``EVENTS``. Notes for ``dva trace``: ``NOTES``. Limits: no relay agents
(giaddr), one pool per device, no ICMP probe before offering, no DHCPv6, long
client identifiers (> 28 bytes) are known by a 224-bit hash.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from dva._jit import kernel
from dva.nf.base import Device, DeviceConfig, DeviceState, Name, drop_code, host_address
from dva.nf.dhcp_defs import (
    ACK,
    B_CHADDR,
    B_CIADDR,
    B_FLAGS,
    B_GIADDR,
    BROADCAST_FLAG,
    C_ACKS,
    C_ARP_REPLY,
    C_DISCOVERS,
    C_EXPIRED,
    C_INFORMS,
    C_NAKS,
    C_OFFERS,
    C_REQUESTS,
    D_ARP_OTHER,
    D_BAD_CSUM,
    D_BAD_REQUEST,
    D_MALFORMED,
    D_NO_ROOM,
    D_NOT_DHCP,
    D_NOT_FOR_ME,
    D_RELAYED,
    D_UNSUP_MSG,
    D_UNSUPPORTED,
    DECLINE,
    DISCOVER,
    DROPS,
    EVENTS,
    F_BOOTP,
    F_CID_LEN,
    F_CID_OFF,
    F_TYPE,
    G_BCAST,
    G_IP,
    G_LEASE,
    G_MAC,
    G_REBIND,
    G_RENEW,
    INFORM,
    KEY_WORDS,
    M32,
    M_CHANGES,
    M_IP_ID,
    N_ARP,
    N_INFORM,
    NAK,
    NCFG,
    NMISC,
    NMSG,
    NOTES,
    OFFER,
    RELEASE,
    REQUEST,
    SERVER_PORT,
)
from dva.nf.dhcp_lease import on_decline, on_discover, on_release, on_request
from dva.nf.dhcp_wire import (
    client_key,
    parse_request,
    reply_length,
    udp_checksum_ok,
    write_reply,
)
from dva.nf.router import RouterPort, derive_mac, parse_mac
from dva.nf.router_arp import answer_arp
from dva.nf.table import I_EXPIRED, HashTable, tbl_needs_rebuild, tbl_sweep
from dva.packet import layout as L
from dva.packet.checksum import rd16, rd32, rd48
from dva.packet.parse import parse_batch

__all__ = ["DROPS", "EVENTS", "NOTES", "Dhcp", "DhcpConfig", "DhcpState", "dhcp_kernel"]

SWEEP_SLOTS = 64
MAX_POOL = 65536
MAX_LEASE_S = 0x7FFFFFFF  # 68 years; 0xFFFFFFFF ("infinite") is not offered
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                        r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


# -- config ------------------------------------------------------------------------

def _host(v: str) -> str:
    """A unicast IPv4 host address, canonical."""
    return str(ipaddress.IPv4Address(host_address(v)))


class Pool(BaseModel):
    """The dynamic range and what every client is told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str
    end: str
    router: str | None = None
    dns: list[str] = Field(default=[], max_length=8)
    domain: str | None = None
    lease: int = Field(default=3600, ge=10, le=MAX_LEASE_S)
    max_lease: int | None = Field(default=None, ge=10, le=MAX_LEASE_S)
    renew: int | None = Field(default=None, ge=1, le=MAX_LEASE_S)
    rebind: int | None = Field(default=None, ge=1, le=MAX_LEASE_S)

    @field_validator("start", "end", "router")
    @classmethod
    def _addr(cls, v):
        return None if v is None else _host(v)

    @field_validator("dns")
    @classmethod
    def _dns(cls, v):
        out = [_host(a) for a in v]
        if len(set(out)) != len(out):
            raise ValueError("a DNS server is listed twice")
        return out

    @field_validator("domain")
    @classmethod
    def _domain(cls, v):
        if v is not None and not _DOMAIN_RE.match(v):
            raise ValueError(f"bad domain name {v!r}: labels of letters, digits and '-', "
                             f"253 characters at most")
        return v

    @property
    def t1(self) -> int:
        return self.renew if self.renew is not None else self.lease // 2

    @property
    def t2(self) -> int:
        return self.rebind if self.rebind is not None else self.lease * 7 // 8

    @property
    def top(self) -> int:
        return self.max_lease if self.max_lease is not None else self.lease


class Reservation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mac: str
    ip: str

    @field_validator("mac")
    @classmethod
    def _mac(cls, v):
        parse_mac(v)
        return v.lower().replace("-", ":")

    @field_validator("ip")
    @classmethod
    def _ip(cls, v):
        return _host(v)


def _issue(loc: tuple, msg: str, value) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("dhcp_config", "{msg}", {"msg": msg}),
                            loc=loc, input=value)


class DhcpConfig(DeviceConfig):
    type: Literal["dhcp"]
    ports: dict[Name, RouterPort]
    pool: Pool
    reservations: list[Reservation] = []
    offer_hold: int = Field(default=60, ge=1, le=3600)
    decline_hold: int = Field(default=600, ge=1, le=86400 * 7)

    @field_validator("ports")
    @classmethod
    def _one_port(cls, v):
        if len(v) != 1:
            raise ValueError("a dhcp server has exactly one port, e.g. {lan: {ip: "
                             "10.0.0.2/24}}")
        (p,) = v.values()
        if p.interface.network.prefixlen > 30:
            raise ValueError(f"the subnet of {p.ip} is too small for DHCP (/30 at most)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DhcpConfig:
        issues: list[InitErrorDetails] = []
        (pname, port), = self.ports.items()
        itf = port.interface
        net = itf.network
        me = itf.ip
        pool = self.pool

        def where(a: ipaddress.IPv4Address, inside: bool) -> str | None:
            if a == me:
                return f"the server's own address ({pname})"
            if inside and a not in net:
                return f"outside the subnet {net}"
            if a in (net.network_address, net.broadcast_address):
                return f"the {'network' if a == net.network_address else 'broadcast'} " \
                       f"address of {net}"
            return None

        lo, hi = ipaddress.IPv4Address(pool.start), ipaddress.IPv4Address(pool.end)
        for f, a in (("start", lo), ("end", hi)):
            if why := where(a, True):
                issues.append(_issue(("pool", f), f"{a} is {why}", str(a)))
        if hi < lo:
            issues.append(_issue(("pool", "end"), f"the range ends ({hi}) before it starts "
                                 f"({lo})", pool.end))
        elif int(hi) - int(lo) + 1 > MAX_POOL:
            issues.append(_issue(("pool", "end"), f"the range holds {int(hi) - int(lo) + 1} "
                                 f"addresses; {MAX_POOL} at most", pool.end))
        elif me in net and lo <= me <= hi:
            issues.append(_issue(("pool", "start"), f"the range {lo}-{hi} holds the "
                                 f"server's own address {me}", pool.start))

        def in_range(a) -> bool:
            return lo <= a <= hi

        infra: dict[ipaddress.IPv4Address, str] = {}
        if pool.router is not None:
            r = ipaddress.IPv4Address(pool.router)
            infra[r] = "the router"
            if why := where(r, True):
                issues.append(_issue(("pool", "router"), f"{r} is {why}", pool.router))
            elif in_range(r):
                issues.append(_issue(("pool", "router"), f"the router {r} is in the range "
                                     f"{lo}-{hi}", pool.router))
        for i, d in enumerate(pool.dns):
            a = ipaddress.IPv4Address(d)
            infra.setdefault(a, f"DNS server {a}")
            if (a in net or a == me) and (why := where(a, True)):
                issues.append(_issue(("pool", "dns", i), f"{a} is {why}"
                                     + (" (it answers DHCP, not DNS)" if a == me else ""), d))
            elif in_range(a):
                issues.append(_issue(("pool", "dns", i), f"DNS server {a} is in the range "
                                     f"{lo}-{hi}", d))
        if not pool.t1 < pool.t2 < pool.lease:
            issues.append(_issue(("pool",), f"renew ({pool.t1}) < rebind ({pool.t2}) < "
                                 f"lease ({pool.lease}) must hold", None))
        if pool.top < pool.lease:
            issues.append(_issue(("pool", "max_lease"), f"max_lease ({pool.top}) is below "
                                 f"lease ({pool.lease})", pool.max_lease))
        macs: dict[str, int] = {}
        ips: dict[str, int] = {}
        for i, r in enumerate(self.reservations):
            a = ipaddress.IPv4Address(r.ip)
            if why := where(a, True):
                issues.append(_issue(("reservations", i, "ip"), f"{a} is {why}", r.ip))
            elif a in infra:
                issues.append(_issue(("reservations", i, "ip"), f"{a} is {infra[a]}", r.ip))
            if r.mac in macs:
                issues.append(_issue(("reservations", i, "mac"), f"{r.mac} is reserved "
                                     f"twice (also reservations[{macs[r.mac]}])", r.mac))
            if r.ip in ips:
                issues.append(_issue(("reservations", i, "ip"), f"{r.ip} is reserved twice "
                                     f"(also reservations[{ips[r.ip]}])", r.ip))
            macs.setdefault(r.mac, i)
            ips.setdefault(r.ip, i)
        if issues:
            raise ValidationError.from_exception_data("DhcpConfig", issues)
        return self

    def port_names(self) -> list[str]:
        return list(self.ports)

    def addresses(self) -> int:
        """How many addresses the server can give (its tables' bound)."""
        lo, hi = int(ipaddress.IPv4Address(self.pool.start)), \
            int(ipaddress.IPv4Address(self.pool.end))
        outside = sum(1 for r in self.reservations
                      if not lo <= int(ipaddress.IPv4Address(r.ip)) <= hi)
        return hi - lo + 1 + outside


# -- state ---------------------------------------------------------------------------

class DhcpState(DeviceState):
    def __init__(self, config: DhcpConfig) -> None:
        super().__init__(len(EVENTS))
        n = config.addresses()
        self.leases = HashTable(key_words=KEY_WORDS, value_words=2, max_entries=n)
        self.addrs = HashTable(key_words=1, value_words=1 + KEY_WORDS, max_entries=n)
        self.shared_tables["leases"] = self.leases
        self.shared_tables["addrs"] = self.addrs
        self.misc = np.zeros(NMISC, np.int64)
        # kernel scratch
        self.key = np.zeros(KEY_WORDS, np.int64)
        self.akey = np.zeros(1, np.int64)
        self.msg = np.zeros(NMSG, np.int64)
        self.cid = np.zeros(256, np.uint8)
        a, b = self.leases, self.addrs
        self.arrays = (a.keys, a.vals, a.state, a.bucket, a.expires, a.info,
                       b.keys, b.vals, b.state, b.bucket, b.expires, b.info,
                       self.misc, self.akey)

    def persist_version(self) -> int:
        """Changes so far: the runtime saves the shared state when this moved."""
        return int(self.misc[M_CHANGES])

    def lease_list(self, now: float) -> list[tuple[str, str, float]]:
        """(address, state, expires) of every live entry, for tests and display."""
        names = {1: "offered", 2: "bound", 3: "declined"}
        out = []
        for (ip,), vals, _, exp in self.addrs.entries(now):
            out.append((str(ipaddress.IPv4Address(ip)), names.get(vals[0], "?"), exp))
        return sorted(out)


# -- kernel ------------------------------------------------------------------------------

@kernel
def _reply_to(mtype, flags, ciaddr, yiaddr, chaddr, src_mac):
    """(IP, MAC) a reply goes to (RFC 2131 4.1, giaddr 0)."""
    if mtype == NAK:
        return M32, L.BCAST_MAC
    if ciaddr != 0:
        return ciaddr, src_mac
    if flags & BROADCAST_FLAG:
        return M32, L.BCAST_MAC
    return yiaddr, chaddr


@kernel
def _answer(data, meta, i, cfg, res, dns, domain, st, events, key, msg, cid, now):
    """Row ``i`` holds a valid DHCP request (``msg`` parsed): run the state machine,
    then write the reply over the frame (returns 1) or set the drop (returns 0)."""
    row = meta[i]
    s = row[L.START]
    slot = row[L.SLOT]
    pkt = data[slot, s:s + row[L.LEN]]
    b = msg[F_BOOTP]
    mac = rd48(pkt, b + B_CHADDR)
    ciaddr = rd32(pkt, b + B_CIADDR)
    t = msg[F_TYPE]
    unicast = rd32(pkt, row[L.L3_OFF] + 16) == cfg[G_IP]
    client_key(pkt, msg, key)
    if t == DISCOVER:
        events[C_DISCOVERS] += 1
        rtype, ip, lease, reason, note = on_discover(st, cfg, res, key, mac, msg, now)
        ci = 0
    elif t == REQUEST:
        events[C_REQUESTS] += 1
        rtype, ip, lease, reason, note = on_request(st, cfg, res, key, mac, msg, ciaddr,
                                                    unicast, events, now)
        ci = ciaddr
    elif t == DECLINE:
        rtype, ip, lease, reason, note = on_decline(st, cfg, key, msg, events, now)
        ci = 0
    elif t == RELEASE:
        rtype, ip, lease, reason, note = on_release(st, cfg, key, msg, ciaddr, events, now)
        ci = 0
    elif t == INFORM:
        events[C_INFORMS] += 1
        if ciaddr == 0:
            rtype, ip, lease, reason, note = 0, 0, 0, D_BAD_REQUEST, 0
        else:
            rtype, ip, lease, reason, note = ACK, 0, 0, -1, N_INFORM
        ci = ciaddr
    else:
        rtype, ip, lease, reason, note = 0, 0, 0, D_UNSUP_MSG, 0
        ci = 0
    row[L.NOTE] = note
    if rtype == 0:
        row[L.VERDICT] = drop_code(reason)
        return 0
    if rtype == NAK:
        ci = 0
    cl = msg[F_CID_LEN]
    if cl < 0:
        cl = 0
    flen = reply_length(rtype, lease, cfg, dns.shape[0], domain.shape[0], cl)
    if s + flen > data.shape[1]:
        row[L.VERDICT] = drop_code(D_NO_ROOM)
        return 0
    co = msg[F_CID_OFF]
    for j in range(cl):
        cid[j] = pkt[co + j]
    dst_ip, dst_mac = _reply_to(rtype, rd16(pkt, b + B_FLAGS), ci, ip, mac, rd48(pkt, 6))
    misc = st[12]
    base = cfg[G_LEASE]
    t1 = cfg[G_RENEW] * lease // base
    t2 = cfg[G_REBIND] * lease // base
    write_reply(data[slot, s:s + flen], b, rtype, ci, ip, lease, t1, t2, dst_ip, dst_mac,
                cfg, dns, domain, cid, cl, misc[M_IP_ID])
    misc[M_IP_ID] += 1
    row[L.LEN] = flen
    row[L.VERDICT] = row[L.IN_PORT]
    if rtype == OFFER:
        events[C_OFFERS] += 1
    elif rtype == ACK:
        events[C_ACKS] += 1
    else:
        events[C_NAKS] += 1
    return 1


@kernel
def dhcp_kernel(data, meta, n, cfg, res, dns, domain, st, events, key, msg, cid,
                bucket_mask, now):
    """Decide rows [0, n); replies are written in place. Returns 1 when a table needs
    a rebuild (tombstones in a quarter of its slots)."""
    (lkeys, lvals, lstate, lbucket, lexp, linfo, akeys, avals, astate, abucket, aexp, ainfo,
     misc, akey) = st
    expired_before = linfo[I_EXPIRED]
    me = cfg[G_IP]
    for i in range(n):
        row = meta[i]
        row[L.NOTE] = 0
        perr = row[L.PERR]
        if perr == L.E_RUNT:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        s = row[L.START]
        slot = row[L.SLOT]
        pkt = data[slot, s:s + row[L.LEN]]
        dmac = rd48(pkt, 0)
        if dmac != cfg[G_MAC] and dmac != L.BCAST_MAC:
            row[L.VERDICT] = drop_code(D_NOT_FOR_ME)
            continue
        etype = row[L.ETYPE]
        if row[L.TAGS] > 0 or perr == L.E_VLAN_TRUNC or perr == L.E_VLAN_MANY \
                or (etype != L.ETH_IPV4 and etype != L.ETH_ARP):
            row[L.VERDICT] = drop_code(D_UNSUPPORTED)
            continue
        if perr != L.E_OK:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        l3 = row[L.L3_OFF]
        if etype == L.ETH_ARP:
            sha = rd48(pkt, l3 + 8)
            if rd16(pkt, l3 + 6) == 1 and rd32(pkt, l3 + 24) == me \
                    and (sha >> 40) & 1 == 0 and sha != 0:
                row[L.LEN] = answer_arp(data[slot], s, l3, cfg[G_MAC], me)
                row[L.VERDICT] = row[L.IN_PORT]
                row[L.NOTE] = N_ARP
                events[C_ARP_REPLY] += 1
                parse_batch(data, meta, i, i + 1, bucket_mask)
            else:
                row[L.VERDICT] = drop_code(D_ARP_OTHER)
            continue
        flags = row[L.PFLAGS]
        if flags & L.F_IP_CSUM_BAD:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        dst = rd32(pkt, l3 + 16)
        if dst != me and dst != M32 and dst != cfg[G_BCAST]:
            row[L.VERDICT] = drop_code(D_NOT_FOR_ME)
            continue
        if flags & L.F_FRAG:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        l4 = row[L.L4_OFF]
        if row[L.PROTO] != L.PROTO_UDP or rd16(pkt, l4 + 2) != SERVER_PORT:
            row[L.VERDICT] = drop_code(D_NOT_DHCP)
            continue
        ulen = rd16(pkt, l4 + 4)
        if not udp_checksum_ok(pkt, l3, l4, ulen):
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        r = parse_request(pkt, l4, l4 + ulen, msg)
        if r >= 0:
            row[L.VERDICT] = drop_code(r)
            continue
        if rd32(pkt, msg[F_BOOTP] + B_GIADDR) != 0:
            row[L.VERDICT] = drop_code(D_RELAYED)
            continue
        if _answer(data, meta, i, cfg, res, dns, domain, st, events, key, msg, cid, now):
            parse_batch(data, meta, i, i + 1, bucket_mask)
    tbl_sweep(lstate, lexp, linfo, now, SWEEP_SLOTS)
    tbl_sweep(astate, aexp, ainfo, now, SWEEP_SLOTS)
    events[C_EXPIRED] += linfo[I_EXPIRED] - expired_before
    return tbl_needs_rebuild(lstate, linfo) or tbl_needs_rebuild(astate, ainfo)


# -- device ----------------------------------------------------------------------------

def _ip(v: str) -> int:
    return int(ipaddress.IPv4Address(v))


class Dhcp(Device):
    type_name = "dhcp"
    config_model = DhcpConfig
    drop_reasons = DROPS
    counters = EVENTS
    notes = NOTES
    persist = True  # leases are saved by the runtime and survive restarts
    replicate_shared = False  # one owner: the worker of the DHCP bucket (bucket_aliases)

    def bucket_aliases(self) -> list[tuple[int, ...]]:
        """Every DHCP message (UDP port 67 or 68 on either side, whatever the
        addresses: 0.0.0.0 and broadcast while selecting, the lease's address when
        renewing or releasing) is bucketed as (server address, 67) <-> (server address,
        68), so one worker sees all of them and owns the leases."""
        me = int(self.cfg[0])
        return [(17, -1, 67, 68, me, 67)]

    def owner_frame(self) -> bytes:
        """A client's broadcast to the server (every DHCP message shares its bucket)."""
        from dva.packet.build import UDP, Eth, IPv4

        return bytes(Eth(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
                     / IPv4(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67))

    def __init__(self, name: str, config: DhcpConfig) -> None:
        super().__init__(name, config)
        (pname, port), = config.ports.items()
        itf = port.interface
        pool = config.pool
        self.mac = parse_mac(port.mac) if port.mac else derive_mac(name, pname)
        cfg = np.zeros(NCFG, np.int64)
        cfg[:] = (int(itf.ip), self.mac, int(itf.network.netmask),
                  int(itf.network.broadcast_address), _ip(pool.router) if pool.router else 0,
                  _ip(pool.start), _ip(pool.end), pool.lease, pool.top, pool.t1, pool.t2,
                  config.offer_hold, config.decline_hold)
        self.cfg = cfg
        self.dns = np.array([_ip(a) for a in pool.dns], np.int64)
        self.domain = np.frombuffer((pool.domain or "").encode("ascii"), np.uint8).copy()
        by_mac = sorted((parse_mac(r.mac), _ip(r.ip)) for r in config.reservations)
        by_ip = sorted((_ip(r.ip), parse_mac(r.mac)) for r in config.reservations)
        col = lambda rows, k: np.array([r[k] for r in rows], np.int64)  # noqa: E731
        self.res = (col(by_mac, 0), col(by_mac, 1), col(by_ip, 0), col(by_ip, 1))

    def new_state(self) -> DhcpState:
        return DhcpState(self.config)

    def describe(self) -> str:
        (pname, port), = self.config.ports.items()
        p = self.config.pool
        return (f"{self.name} ({self.type_name}: {pname} {port.ip}, pool {p.start}-{p.end}, "
                f"{len(self.config.reservations)} reservations)")

    def process(self, batch, state: DhcpState, now: float) -> None:
        rebuild = dhcp_kernel(batch.pool.data, batch.meta, batch.n, self.cfg, self.res,
                              self.dns, self.domain, state.arrays, state.events, state.key,
                              state.msg, state.cid, state.bucket_mask, float(now))
        if rebuild:
            if state.leases.needs_rebuild():
                state.events[C_EXPIRED] += state.leases.rebuild(now)
            if state.addrs.needs_rebuild():
                state.addrs.rebuild(now)
