"""``lb``: a layer-4 load balancer (virtual IPs, Maglev consistent hashing).

Ports: the two names in ``ports``, the clients' side first (e.g. ``[front, back]``).
Like ``nat`` it is a bump in the wire that rewrites IP addresses and ports (with
incremental checksum updates, RFC 1624), not Ethernet addresses: it sits between the
clients' link and the router in front of the backends (or between two routers), so
that the router after it delivers a rewritten packet by its new address.

Config::

    type: lb
    ports: [front, back]
    mode: dnat                 # or fullnat (needs snat)
    snat: 10.0.9.1             # fullnat: the source address toward the backends
    snat_ports: 1024-65535     # fullnat: source ports
    table_size: 65537          # Maglev lookup table entries per VIP (a prime)
    vips:
      web:                     # a name (counters and health use it)
        addr: 203.0.113.10
        proto: tcp             # or udp
        port: 80
        backends:
          - {addr: 10.0.1.11, port: 8000, weight: 2}
          - {addr: 10.0.1.12}                 # port: the VIP's; weight 1
          - {addr: 10.0.1.13, up: false}      # administratively down
    max_flows: 65536           # connections (fullnat: each holds 2 table entries)
    timeouts: {udp: 60}        # conntrack timeouts (conntrack.DEFAULT_TIMEOUTS)
    flush: false               # on a config reload: forget connections

Rejected: a table size that is not prime or not larger than 100x the backends of a
VIP, two VIPs on one (address, protocol, port), a backend listed twice in a VIP, a
backend on a VIP address, ``snat`` with ``mode: dnat`` or without ``mode: fullnat``.

Behaviour (drop reasons in ``DROPS``):

* A TCP SYN or a UDP packet from the front port to a VIP opens a connection: its
  backend is the entry ``HASH % table_size`` of the VIP's **Maglev table**
  (:mod:`dva.nf.maglev`; ``HASH`` is the symmetric flow hash of the parser), so every
  worker picks the same backend for the same flow, and adding or removing a backend
  moves about 1/N of new flows. No backend up: ``no_backend``. The connection is
  tracked (:mod:`dva.nf.conntrack`, TCP states and windows, invalid packets dropped
  ``invalid``) and all its packets, both ways, keep its backend for its life: a
  change of backends or of their health never moves a live connection.
* ``dnat``: the destination becomes the backend (address, port); replies from it
  get the VIP back as their source. The backend sees the client's address. A
  connection has one entry (E1, keyed by the client's tuple to the VIP): a reply's
  tuple (backend -> client) names it through the VIPs that list that backend
  endpoint (one, unless a backend is listed in several VIPs), so no second entry is
  made and a new connection costs one insert.
* ``fullnat``: also the source becomes (``snat``, a port), chosen so that the
  translated flow stays in the **flow bucket** of the original
  (:func:`dva.packet.parse.term_port`), and free; none free: ``ports_exhausted``.
  The backends reply to ``snat``, which must be routed back to the LB's back port.
* Other traffic passes untouched and untracked (counted ``untracked_passed``):
  anything that is neither to a VIP address from the front, nor from a backend
  address (dnat) or to ``snat`` (fullnat) from the back; and, among those, what is
  not a connection to a VIP port (a backend's own connections, pings of a VIP
  address).
* ICMP errors about a balanced connection are translated (RFC 5508, as ``nat``);
  errors about anything else pass.
* ARP passes; other non-IPv4 frames and VLAN-tagged ones: ``unsupported``; parse
  errors ``malformed``; bad IPv4 header checksum ``bad_checksum``; a non-first
  fragment to a VIP address (no ports to balance by): ``fragment``. A new
  connection whose translated tuple is in use already (dnat: the same client
  endpoint has a connection to another VIP on the same backend endpoint):
  ``tuple_in_use``.

Health: a backend is used when its config says ``up`` (default) and its health
state, if any, says up: :meth:`Lb.set_health` (a health checker or the manager)
writes it into the shared ``health`` table, which carries over config reloads and
is replicated like other shared state; the Maglev tables are rebuilt from it.

Both directions on one worker: in ``fullnat`` by the port choice above; in ``dnat``
the reply's tuple (backend -> client) hashes elsewhere, so a multi-worker dispatcher
must steer replies to the owner (as for ``nat``'s port forwards).

State (:class:`LbState`): the connection table (flow state: E1/E2 entries of
:mod:`dva.nf.xlat`, E1 alone in ``dnat``, each with its backend's number as
conntrack's aux; ``max_flows`` connections, so ``2 * max_flows`` entries in
``fullnat``), the ``health`` table (shared) and the Maglev tables derived from
config and health. Counters: ``conntrack.CT_EVENTS``,
``EVENTS``, then per VIP and backend ``VIP/ADDR:PORT flows`` (connections given to
it) and ``VIP/ADDR:PORT packets`` (packets of its connections, both ways).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dva._jit import inline_kernel, kernel
from dva.nf.base import (
    Device,
    DeviceConfig,
    DeviceState,
    Name,
    drop_code,
    host_address,
    port_range,
    two_ports,
)
from dva.nf.conntrack import (
    CT_EVENTS,
    E_RELATED,
    ESTABLISHED,
    F_ORIG_A,
    FOUND,
    INVALID,
    KEY_WORDS,
    MAX_FLOWS_LIMIT,
    NEW,
    RELATED,
    REOPEN,
    SWEEP_BATCH,
    SWEEP_TICK,
    V_FLAGS,
    Conntrack,
    check_timeouts,
    ct_advance,
    ct_aux,
    ct_classify,
    ct_classify_at,
    ct_copy_values,
    ct_create,
    ct_delete,
    ct_first_line,
    ct_flags_word,
    ct_make_key,
    ct_ported,
    ct_prefetch_ctrl,
    ct_quoted,
    ct_row_key,
    ct_set_aux,
    ct_sweep,
    pack32,
    timeouts_array,
)
from dva.nf.maglev import DEFAULT_SIZE, MAX_SIZE, build_table, is_prime
from dva.nf.table import (
    HOT_ONLY,
    I_EXPIRED,
    HashTable,
    sorted_find,
    tbl_begin_pass,
    tbl_hash,
    tbl_insert_inline,
    tbl_lookup,
    tbl_lookup_at,
    tbl_prefetch_ctrl,
    tbl_prefetch_found_ahead,
)
from dva.nf.xlat import (
    KIND_ORIG,
    KIND_XLAT,
    NUSER,
    entry_kind,
    entry_ports,
    icmp_error_xlat,
    icmp_error_xlat_from,
    packet_tuple,
    prefetch_e1_ahead,
    refresh_due,
    set_meta,
    set_x,
    touch_e2,
    translate,
    translate_first,
    x_tuple,
)
from dva.packet import layout as L
from dva.packet.checksum import rd16, rd32
from dva.packet.parse import M32, addr_hash, endpoint_term, term_port

DROPS = (
    "malformed",  # a parse error
    "bad_checksum",  # IPv4 header checksum
    "unsupported",  # not IPv4 or ARP (IPv6 included), or VLAN-tagged
    "fragment",  # a non-first fragment to a VIP address: no ports to balance by
    "invalid",  # conntrack: invalid (e.g. a TCP segment to a VIP of no connection)
    "no_backend",  # every backend of the VIP is down
    "ports_exhausted",  # fullnat: no free source port of the flow's bucket class
    "table_full",  # connection table full of established entries
    "tuple_in_use",  # the translated tuple belongs to another connection
)
(D_MALFORMED, D_BAD_CSUM, D_UNSUPPORTED, D_FRAGMENT, D_INVALID, D_NO_BACKEND,
 D_EXHAUSTED, D_TABLE_FULL, D_IN_USE) = range(len(DROPS))

EVENTS = ("balanced_flows", "untracked_passed", "icmp_errors_translated")
NCT = len(CT_EVENTS)
C_BALANCED, C_PASSED, C_ICMP_XLATE = range(NCT, NCT + len(EVENTS))
C_BACKENDS = NCT + len(EVENTS)  # per backend b: flows at + 2b, packets at + 2b + 1

NOTES = ("", "to the backend", "back from the backend", "passes untracked",
         "new: balanced", "ARP passes", "ICMP error translated")
N_FWD, N_BACK, N_PASS, N_NEW, N_ARP, N_ICMP = range(1, len(NOTES))

P_ALONE = 1 << 16  # in the ports word: a DNAT connection without E2 (its E1 names it)
MAX_VIPS = 1024
MAX_BACKENDS = 4096
# vips[] columns, backends[] columns, cfg[]
V_ADDR, V_PROTO, V_PORT, V_FIRST, V_COUNT, V_HASH = range(6)
B_ADDR, B_PORT, B_VIP, B_HASH, B_EP = range(5)  # B_EP: its endpoint's index (dnat)
G_FULLNAT, G_SNAT, G_SNAT_H, G_PLO, G_PHI = range(5)
HEALTH_LIFE = 100 * 365 * 86400.0  # health entries do not expire


# -- config ------------------------------------------------------------------------

class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    addr: str
    port: int | None = Field(default=None, ge=1, le=65535)
    weight: int = Field(default=1, ge=1, le=1000)
    up: bool = True

    @field_validator("addr")
    @classmethod
    def _a(cls, v):
        host_address(v)
        return v


class Vip(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    addr: str
    proto: Literal["tcp", "udp"]
    port: int = Field(ge=1, le=65535)
    backends: list[Backend] = Field(min_length=1)

    @field_validator("addr")
    @classmethod
    def _a(cls, v):
        host_address(v)
        return v

    def endpoints(self) -> list[tuple[int, int]]:
        return [(host_address(b.addr), b.port or self.port) for b in self.backends]

    @model_validator(mode="after")
    def _unique(self) -> Vip:
        eps = self.endpoints()
        for i, ep in enumerate(eps):
            if ep in eps[:i]:
                raise ValueError(f"backends[{i}]: {self.backends[i].addr}:{ep[1]} is "
                                 f"listed twice")
        return self


class LbConfig(DeviceConfig):
    type: Literal["lb"]
    ports: list[Name]
    mode: Literal["dnat", "fullnat"] = "dnat"
    snat: str | None = None
    snat_ports: int | str = "1024-65535"
    table_size: int = Field(default=DEFAULT_SIZE, ge=2, le=MAX_SIZE)
    vips: dict[Name, Vip] = Field(min_length=1, max_length=MAX_VIPS)
    max_flows: int = Field(default=65536, ge=1, le=MAX_FLOWS_LIMIT // 2)
    timeouts: dict[str, float] = {}
    flush: bool = False

    @field_validator("ports")
    @classmethod
    def _two_ports(cls, v):
        return two_ports(v, "lb", " (clients' side first)")

    @field_validator("timeouts")
    @classmethod
    def _timeouts(cls, v):
        return check_timeouts(v)

    @field_validator("snat")
    @classmethod
    def _snat(cls, v):
        if v is not None:
            host_address(v)
        return v

    @field_validator("snat_ports")
    @classmethod
    def _ports(cls, v):
        lo, _ = port_range(v, "snat_ports")
        if lo == 0:
            raise ValueError("port 0 cannot be used")
        return v

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v):
        if not is_prime(v):
            raise ValueError(f"table_size {v} is not prime (e.g. 251, 4093, 65537, "
                             f"1000003)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LbConfig:
        if self.mode == "fullnat" and self.snat is None:
            raise ValueError("mode fullnat needs snat (the source address toward the "
                             "backends)")
        if self.mode == "dnat" and self.snat is not None:
            raise ValueError("snat is for mode fullnat")
        seen: dict[tuple[int, str, int], str] = {}
        vip_addrs = {host_address(v.addr) for v in self.vips.values()}
        total = 0
        for name, v in self.vips.items():
            k = (host_address(v.addr), v.proto, v.port)
            if k in seen:
                raise ValueError(f"vips.{name}: {v.addr} {v.proto} {v.port} is also VIP "
                                 f"{seen[k]}")
            seen[k] = name
            if len(v.backends) * 100 > self.table_size:
                raise ValueError(f"vips.{name}: {len(v.backends)} backends need a "
                                 f"table_size of at least 100x that (a prime)")
            for i, (a, _) in enumerate(v.endpoints()):
                if a in vip_addrs:
                    raise ValueError(f"vips.{name}.backends[{i}]: a backend cannot be "
                                     f"on a VIP address")
            total += len(v.backends)
        if total > MAX_BACKENDS:
            raise ValueError(f"{total} backends: at most {MAX_BACKENDS}")
        if self.snat is not None and host_address(self.snat) in vip_addrs:
            raise ValueError("snat cannot be a VIP address")
        return self

    def port_names(self) -> list[str]:
        return list(self.ports)


# -- state -------------------------------------------------------------------------

def _health_key(vip: Vip, addr: int, port: int) -> tuple[int, int]:
    proto = L.PROTO_TCP if vip.proto == "tcp" else L.PROTO_UDP
    return pack32(host_address(vip.addr), (proto << 16) | vip.port), pack32(addr, port)


class LbState(DeviceState):
    def __init__(self, config: LbConfig) -> None:
        super().__init__(C_BACKENDS + 2 * sum(len(v.backends) for v in config.vips.values()))
        self.config = config
        per_conn = 2 if config.mode == "fullnat" else 1
        self.ct = Conntrack(per_conn * config.max_flows, user_words=NUSER)
        self.flow_tables["conntrack"] = self.ct.table
        self.health = HashTable(2, 1, MAX_BACKENDS)
        self.shared_tables["health"] = self.health
        self.maglev = np.full((len(config.vips), config.table_size), -1, np.int32)
        self.key2 = np.zeros(KEY_WORDS, np.int64)
        self.flags = np.zeros(1, np.int64)
        self.rebuild_tables(0.0)

    def backend_up(self, vip: Vip, b: Backend, now: float) -> bool:
        """Config says up and the health state, if any, too."""
        if not b.up:
            return False
        h = self.health.get(_health_key(vip, host_address(b.addr), b.port or vip.port), now)
        return h is None or bool(h[0])

    def rebuild_tables(self, now: float) -> None:
        t = self.config.table_size
        for v, vip in enumerate(self.config.vips.values()):
            names = [f"{a}:{p}" for a, p in
                     ((b.addr, b.port or vip.port) for b in vip.backends)]
            build_table(names, [b.weight for b in vip.backends],
                        [self.backend_up(vip, b, now) for b in vip.backends], t,
                        out=self.maglev[v])

    def import_shared(self, data: bytes, now: float) -> int:
        n = super().import_shared(data, now)
        self.rebuild_tables(now)
        return n


# -- kernels ---------------------------------------------------------------------------

@kernel
def _find_vip(vips, addr, proto, port):
    for v in range(vips.shape[0]):
        if vips[v, V_ADDR] == addr and vips[v, V_PROTO] == proto and vips[v, V_PORT] == port:
            return v
    return -1


@kernel
def _snat_port(keys, state, expires, info, key2, zone, proto, sa, sp, dp, nda, ndp, hv,
               hb, cfg, mask, now):
    """A free fullnat source port that keeps the flow bucket when (sa, sp) -> (VIP hv,
    dp) becomes (snat, port) -> (nda/hb, ndp); -1 when every one is taken."""
    hc = addr_hash(sa, 0, 0, 0)
    term = (endpoint_term(hc, sp) + endpoint_term(hv, dp) - endpoint_term(hb, ndp)) & M32
    cls = term_port(term, cfg[G_SNAT_H], mask)
    lo = cfg[G_PLO]
    hi = cfg[G_PHI]
    nb = mask + 1
    j0 = (lo - cls + nb - 1) // nb if lo > cls else 0
    j1 = (hi - cls) // nb if hi >= cls else -1
    count = j1 - j0 + 1
    if count <= 0:
        return -1
    start = ((hc ^ (sp * 0x9E3779B1)) & 0x7FFFFFFF) % count
    for m in range(count):
        port = cls + (j0 + (start + m) % count) * nb
        ct_make_key(key2, zone, proto, cfg[G_SNAT], port, nda, ndp)
        if tbl_lookup(keys, state, expires, info, key2, now) < 0:
            return port
    return -1


@inline_kernel
def ep_key(proto, addr, port):
    """A backend endpoint (protocol, address, port) as one sortable word."""
    return (proto << 48) | (addr << 16) | port


@inline_kernel
def _e1_of(keys, state, expires, info, vals, key, zone, proto, ca, cp, k, ep_first,
           ep_rows, backends, vips, skip, now, c):
    """DNAT: the connection (E1) of client endpoint (ca, cp) on backend endpoint
    number ``k`` (``Lb.ep_keys``), through each VIP that lists the endpoint but VIP
    ``skip``: the live E1 of (ca, cp) -> that VIP whose translated tuple is (ca,
    cp) -> the endpoint; -1 when there is none. ``c``: the candidate slot of the
    first VIP's key (the run-ahead's), or -1. ``key`` is overwritten."""
    for j in range(ep_first[k], ep_first[k + 1]):
        b = ep_rows[j]
        u = backends[b, B_VIP]
        if u == skip:
            continue
        ct_make_key(key, zone, proto, ca, cp, vips[u, V_ADDR], vips[u, V_PORT])
        e = tbl_lookup_at(keys, state, expires, info, key, now,
                          c if j == ep_first[k] else -1)
        if e >= 0 and entry_kind(vals, e) == KIND_ORIG:
            ts, tsp, td, tdp = x_tuple(vals, e)  # E1 keeps T
            if ts == ca and tsp == cp and td == backends[b, B_ADDR] \
                    and tdp == backends[b, B_PORT]:
                return e
    return -1


@inline_kernel
def _new_conn(data, row, keys, vals, state, bucket, expires, info, key, key2, vips,
              backends, ep_first, ep_rows, maglev, cfg, mask, a_is_src, v, timeouts,
              events, now, c1):
    """Open the connection of a NEW packet to VIP ``v``: choose its backend, create
    E1 (and in fullnat E2), rewrite the packet. ``c1``: E1's candidate slot, or -1
    (:func:`dva.nf.conntrack.ct_create`). Returns E1's slot or -1 - drop reason."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    end = l3 + rd16(pkt, l3 + 2)
    proto = row[L.PROTO]
    zone = row[L.TENANT]
    sa, sp, da, dp = packet_tuple(pkt, l3, l4, end, proto)
    j = maglev[v, row[L.HASH] % maglev.shape[1]]
    if j < 0:
        return -1 - D_NO_BACKEND
    b = vips[v, V_FIRST] + j
    nda = backends[b, B_ADDR]
    ndp = backends[b, B_PORT]
    nsa = sa
    nsp = sp
    fullnat = cfg[G_FULLNAT] != 0
    if fullnat:
        nsa = cfg[G_SNAT]
        nsp = _snat_port(keys, state, expires, info, key2, zone, proto, sa, sp, dp, nda,
                         ndp, vips[v, V_HASH], backends[b, B_HASH], cfg, mask, now)
        if nsp < 0:
            return -1 - D_EXHAUSTED
    else:
        # the reply's tuple names the connection through the VIPs listing the
        # backend endpoint: another VIP's connection from this client endpoint on it
        # would make it ambiguous
        k = backends[b, B_EP]
        if ep_first[k + 1] - ep_first[k] > 1 and \
                _e1_of(keys, state, expires, info, vals, key2, zone, proto, sa, sp, k,
                       ep_first, ep_rows, backends, vips, v, now, -1) >= 0:
            return -1 - D_IN_USE
    e1 = ct_create(keys, vals, state, bucket, expires, info, key, a_is_src, data, row, b,
                   timeouts, events, 0, now, c1)
    if e1 < 0:
        return -1 - D_TABLE_FULL
    # E1's key is O (sa, sp, da, dp), as the packet came
    set_x(vals, e1, nsa, nsp, nda, ndp)
    # in by port 0 (front), out by port 1 (back); refresh time 0: in fullnat, E2's
    # lifetime is due now
    set_meta(vals, e1, KIND_ORIG, (1 << 8) if fullnat else ((1 << 8) | P_ALONE))
    if fullnat:
        a2 = ct_make_key(key2, zone, proto, nsa, nsp, nda, ndp)
        e2 = tbl_insert_inline(keys, state, bucket, expires, info, key2, row[L.BUCKET],
                               refresh_due(vals, expires, e1, now), now)
        if e2 < 0:
            ct_delete(state, info, e1)
            return -1 - D_TABLE_FULL
        ct_copy_values(vals, e1, e2, proto)
        vals[e2, V_FLAGS] = ct_flags_word(F_ORIG_A if a2 else 0, b)
        set_meta(vals, e2, KIND_XLAT, entry_ports(vals, e1))
        set_x(vals, e2, sa, sp, da, dp)  # E2's key is T
    translate_first(pkt, l3, l4, end, proto, sa, sp, da, dp, nsa, nsp, nda, ndp)
    events[C_BALANCED] += 1
    events[C_BACKENDS + 2 * b] += 1
    events[C_BACKENDS + 2 * b + 1] += 1
    return e1


@kernel
def _count(vals, e, backends, events):
    """One more packet for the backend of connection ``e`` (E1). After a reload
    renumbered the backends the number is looked up again by address and port (once
    per connection; -1 when the backend is no longer listed: not counted)."""
    b = ct_aux(vals, e)
    _, _, a, p = x_tuple(vals, e)
    if b < 0 or b >= backends.shape[0] or backends[b, B_ADDR] != a \
            or backends[b, B_PORT] != p:
        if b == -1:
            return
        b = -1
        for j in range(backends.shape[0]):
            if backends[j, B_ADDR] == a and backends[j, B_PORT] == p:
                b = j
                break
        ct_set_aux(vals, e, b)
        if b < 0:
            return
    events[C_BACKENDS + 2 * b + 1] += 1


@kernel
def _dnat_prefetch_ctrl(state, info, key, data, meta, n, hs, rev, vips, backends,
                        ep_keys, ep_first, ep_rows):
    """DNAT's first run-ahead pass, in place of :func:`ct_prefetch_ctrl` (the second
    is the decision loop's, as there; ``hs`` ends with the candidates): a TCP/UDP
    row from the back port whose source is a
    backend endpoint is looked up by the key of its connection -- the client's tuple
    to the first VIP that lists the endpoint, as :func:`_e1_of` looks it up -- not
    by its own tuple, which names no entry. ``rev[i]``: that endpoint's number, or
    -1 for a row looked up by its own key (or not at all). Only the first line of a
    UDP row's record is fetched (:func:`dva.nf.conntrack.ct_first_line`)."""
    tbl_begin_pass(info)
    for i in range(n):
        row = meta[i]
        hs[i] = -1
        rev[i] = -1
        if not ct_ported(row):
            continue
        k = -1
        if row[L.IN_PORT] == 1:
            s0 = row[L.START]
            pkt = data[row[L.SLOT], s0:s0 + row[L.LEN]]
            l3 = row[L.L3_OFF]
            l4 = row[L.L4_OFF]
            proto = row[L.PROTO]
            k = sorted_find(ep_keys, ep_key(proto, rd32(pkt, l3 + 12), rd16(pkt, l4)))
            if k >= 0:
                v = backends[ep_rows[ep_first[k]], B_VIP]
                ct_make_key(key, row[L.TENANT], proto, rd32(pkt, l3 + 16),
                            rd16(pkt, l4 + 2), vips[v, V_ADDR], vips[v, V_PORT])
        if k < 0:
            ct_row_key(key, data, row)
        rev[i] = k
        h = tbl_hash(key)
        hs[i] = h | HOT_ONLY if ct_first_line(row) else h
        tbl_prefetch_ctrl(state, h)


@kernel
def lb_kernel(data, meta, n, mask, now, sweep, keys, vals, state, bucket, expires, info,
              key, slots, hints, key2, vips, vip_addrs, backends, be_addrs, ep_keys,
              ep_first, ep_rows, maglev, cfg, timeouts, events, flags):
    """Decide and translate rows [0, n). Returns the row count (nothing appended).
    ``hints[i]``: row i's candidate slot from the run-ahead; ``slots[i]`` (dnat):
    its backend endpoint's number from :func:`_dnat_prefetch_ctrl`."""
    expired_before = info[I_EXPIRED]
    fullnat = cfg[G_FULLNAT] != 0
    if fullnat:
        ct_prefetch_ctrl(state, info, key, data, meta, n, hints)
    else:
        _dnat_prefetch_ctrl(state, info, key, data, meta, n, hints, slots, vips, backends,
                            ep_keys, ep_first, ep_rows)
    for i in range(n):
        tbl_prefetch_found_ahead(state, expires, hints, i, n)  # hints[i]: a candidate
        if fullnat:
            prefetch_e1_ahead(meta, i, n, state, vals, expires, key2, 1, hints)
        row = meta[i]
        row[L.NOTE] = 0
        inp = row[L.IN_PORT]
        etype = row[L.ETYPE]
        if row[L.PERR] != L.E_OK:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        if row[L.TAGS] > 0 or (etype != L.ETH_IPV4 and etype != L.ETH_ARP):
            row[L.VERDICT] = drop_code(D_UNSUPPORTED)
            continue
        if etype == L.ETH_ARP:
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_ARP
            continue
        if row[L.PFLAGS] & L.F_IP_CSUM_BAD:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + row[L.LEN]]
        l3 = row[L.L3_OFF]
        src = rd32(pkt, l3 + 12)
        dst = rd32(pkt, l3 + 16)
        error = (row[L.PFLAGS] & L.F_ICMP_ERROR) != 0
        if inp == 0:
            ours = sorted_find(vip_addrs, dst) >= 0
        elif fullnat:
            ours = dst == cfg[G_SNAT]
        else:
            ours = sorted_find(be_addrs, src) >= 0
        if not ours and not error:
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_PASS
            events[C_PASSED] += 1
            continue
        if row[L.PFLAGS] & L.F_LATER_FRAG:
            if inp == 0 and ours:
                row[L.VERDICT] = drop_code(D_FRAGMENT)
            else:
                row[L.VERDICT] = 1 - inp
                row[L.NOTE] = N_PASS
                events[C_PASSED] += 1
            continue
        proto = row[L.PROTO]
        l4 = row[L.L4_OFF]
        end = l3 + rd16(pkt, l3 + 2)
        zone = row[L.TENANT]
        hint = hints[i]
        xe = -1  # dnat: the connection a packet from a backend endpoint belongs to
        if not fullnat and inp == 1:
            if slots[i] >= 0:  # from a backend endpoint: a reply?
                xe = _e1_of(keys, state, expires, info, vals, key, zone, proto, dst,
                            rd16(pkt, l4 + 2), slots[i], ep_first, ep_rows, backends,
                            vips, -1, now, hint)
                hint = -1  # the candidate was of that key, not of the row's own
            elif error:  # about a packet sent to a backend endpoint?
                ok, qp, qa, qap, qb, qbp = ct_quoted(pkt, end, l4)
                k = sorted_find(ep_keys, ep_key(qp, qb, qbp)) if ok else -1
                e = -1
                if k >= 0:
                    e = _e1_of(keys, state, expires, info, vals, key, zone, qp, qa, qap,
                               k, ep_first, ep_rows, backends, vips, -1, now, -1)
                if e >= 0:
                    row[L.VERDICT] = icmp_error_xlat_from(data, row, keys, vals, e,
                                                          True)
                    row[L.NOTE] = N_ICMP
                    events[E_RELATED] += 1
                    events[C_ICMP_XLATE] += 1
                    continue
        if xe >= 0:
            r, e, d = FOUND, xe, 1
        else:
            r, e, d = ct_classify_at(keys, state, vals, expires, info, key, data, row,
                                     events, 0, now, hint)
        if r == RELATED:
            row[L.VERDICT] = icmp_error_xlat(data, row, keys, vals, e)
            row[L.NOTE] = N_ICMP
            events[C_ICMP_XLATE] += 1
            continue
        v = -1
        if inp == 0 and ours and (proto == L.PROTO_TCP or proto == L.PROTO_UDP):
            v = _find_vip(vips, dst, proto, rd16(pkt, l4 + 2))
        if r == INVALID:
            if v >= 0:
                row[L.VERDICT] = drop_code(D_INVALID)
            else:  # not a VIP's (an error about nothing of ours, a backend's own)
                row[L.VERDICT] = 1 - inp
                row[L.NOTE] = N_PASS
                events[C_PASSED] += 1
            continue
        if r != FOUND and r != NEW:  # untracked protocols and ICMP messages
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_PASS
            events[C_PASSED] += 1
            continue
        if r == FOUND and (xe >= 0 or entry_kind(vals, e) == KIND_XLAT):
            # a reply from the backend (found by E2, or in dnat through E1): back to
            # the original tuple, then the connection's own entry (E1) judges it
            e2 = e
            translate(pkt, l3, l4, end, proto, keys, vals, e2, False)
            ports = entry_ports(vals, e2)
            r, e, d = ct_classify_at(keys, state, vals, expires, info, key, data, row,
                                     events, 0, now, e2)
            if r != FOUND or entry_kind(vals, e) != KIND_ORIG:
                row[L.VERDICT] = drop_code(D_INVALID)  # the connection is gone
                continue
            if ct_advance(vals, expires, e, d, data, row, timeouts, events, 0, now) \
                    != ESTABLISHED:
                row[L.VERDICT] = drop_code(D_INVALID)
                continue
            if (ports & P_ALONE) == 0:
                exp = refresh_due(vals, expires, e, now)
                if exp > 0.0:
                    touch_e2(keys, state, expires, info, vals, key2, e, zone, proto, exp,
                             now)
            _count(vals, e, backends, events)
            row[L.VERDICT] = (ports & 0xFF) if d == 1 else ((ports >> 8) & 0xFF)
            row[L.NOTE] = N_BACK
            continue
        if r == FOUND:
            a = ct_advance(vals, expires, e, d, data, row, timeouts, events, 0, now)
            if a == INVALID:
                row[L.VERDICT] = drop_code(D_INVALID)
                continue
            if a == REOPEN:
                # a new connection on a closed one's ports: forget it (its E2, if
                # any, expires soon)
                ct_delete(state, info, e)
                r, e, d = ct_classify(keys, state, vals, expires, info, key, data, row,
                                      events, 0, now)
            else:
                if d == 1:  # a reply that was not translated back
                    row[L.VERDICT] = drop_code(D_INVALID)
                    continue
                translate(pkt, l3, l4, end, proto, keys, vals, e, True)
                if (entry_ports(vals, e) & P_ALONE) == 0:
                    exp = refresh_due(vals, expires, e, now)
                    if exp > 0.0:
                        touch_e2(keys, state, expires, info, vals, key2, e, zone, proto,
                                 exp, now)
                _count(vals, e, backends, events)
                row[L.VERDICT] = (entry_ports(vals, e) >> 8) & 0xFF
                row[L.NOTE] = N_FWD
                continue
        if r != NEW:
            row[L.VERDICT] = drop_code(D_INVALID)
            continue
        if v < 0:  # not to a VIP port: nothing to balance
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_PASS
            events[C_PASSED] += 1
            continue
        e = _new_conn(data, row, keys, vals, state, bucket, expires, info, key, key2,
                      vips, backends, ep_first, ep_rows, maglev, cfg, mask, d, v,
                      timeouts, events, now, hint)
        if e < 0:
            row[L.VERDICT] = drop_code(-1 - e)
            continue
        row[L.VERDICT] = 1
        row[L.NOTE] = N_NEW
    flags[0] = ct_sweep(state, expires, info, events, 0, now, sweep, expired_before)
    return n


# -- device ----------------------------------------------------------------------------

class Lb(Device):
    type_name = "lb"
    config_model = LbConfig
    drop_reasons = DROPS
    counters = CT_EVENTS + EVENTS
    notes = NOTES
    ticks = True  # expiry goes on while no packet comes

    def __init__(self, name: str, config: LbConfig) -> None:
        super().__init__(name, config)
        vips, backends, names, eps = [], [], [], []
        for vname, v in config.vips.items():
            proto = L.PROTO_TCP if v.proto == "tcp" else L.PROTO_UDP
            va = host_address(v.addr)
            vips.append((va, proto, v.port, len(backends), len(v.backends),
                         int(addr_hash(va, 0, 0, 0))))
            for a, p in v.endpoints():
                backends.append([a, p, len(vips) - 1, int(addr_hash(a, 0, 0, 0)), 0])
                eps.append(ep_key(proto, a, p))
                names.append(f"{vname}/{ipaddress.IPv4Address(a)}:{p}")
        # backend endpoints (protocol, address, port), sorted, and for each the
        # backends (rows) that are it: one per VIP listing it
        self.ep_keys = np.unique(np.array(eps, np.int64))
        rows = [[] for _ in self.ep_keys]
        for b, k in enumerate(eps):
            backends[b][B_EP] = int(np.searchsorted(self.ep_keys, k))
            rows[backends[b][B_EP]].append(b)
        self.ep_first = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        self.ep_rows = np.array([b for r in rows for b in r], np.int64)
        self.vips = np.array(vips, np.int64).reshape(-1, 6)
        self.backends = np.array(backends, np.int64).reshape(-1, 5)
        self.vip_addrs = np.unique(self.vips[:, V_ADDR])
        self.be_addrs = np.unique(self.backends[:, B_ADDR])
        self.counters = CT_EVENTS + EVENTS + tuple(
            f"{n} {what}" for n in names for what in ("flows", "packets"))
        fullnat = config.mode == "fullnat"
        snat = host_address(config.snat) if fullnat else 0
        lo, hi = port_range(config.snat_ports)
        self.cfg = np.array([fullnat, snat, int(addr_hash(snat, 0, 0, 0)), lo, hi],
                            np.int64)
        self.timeouts = timeouts_array(config.timeouts)
        self.flush_on_reload = config.flush

    def bucket_aliases(self) -> list[tuple[int, ...]]:
        """In DNAT mode a reply comes from the backend: a backend endpoint stands for
        its VIP (full-NAT picks bucket-keeping source ports instead)."""
        if self.config.mode != "dnat":
            return []
        rows = []
        for vip in self.config.vips.values():
            proto = L.PROTO_TCP if vip.proto == "tcp" else L.PROTO_UDP
            va = host_address(vip.addr)
            for a, port in vip.endpoints():
                rows.append((proto, a, port, port, va, vip.port))
        return rows

    def new_state(self) -> LbState:
        return LbState(self.config)

    def describe(self) -> str:
        c = self.config
        return (f"{self.name} ({self.type_name} {c.mode}: {len(c.vips)} VIPs, "
                f"{len(self.backends)} backends)")

    def set_health(self, state: LbState, vip: str, backend: str, up: bool,
                   now: float) -> None:
        """Mark backend ``ADDR[:PORT]`` of VIP ``vip`` up or down (health state) and
        rebuild the Maglev tables. Live connections keep their backend."""
        v = self.config.vips.get(vip)
        if v is None:
            raise KeyError(f"{self.name}: no VIP {vip!r}")
        a, _, p = backend.partition(":")
        ep = (host_address(a), int(p) if p else v.port)
        if ep not in v.endpoints():
            raise KeyError(f"{self.name}: VIP {vip} has no backend {backend}")
        state.health.put(_health_key(v, *ep), [int(up)], expires=now + HEALTH_LIFE,
                         now=now)
        state.rebuild_tables(now)

    def _bind(self, state: LbState, rows: int) -> tuple[tuple, int]:
        """lb_kernel's arguments that stay the same (:meth:`DeviceState.bound`)."""
        t = state.ct.table
        slots, hints = state.scratch(rows, "slots"), state.scratch(rows, "hints")
        return (t.keys, t.vals, t.state, t.bucket, t.expires, t.info, state.ct.key, slots,
                hints, state.key2, self.vips, self.vip_addrs, self.backends,
                self.be_addrs, self.ep_keys, self.ep_first, self.ep_rows, state.maglev,
                self.cfg, self.timeouts, state.events, state.flags), min(len(slots), len(hints))

    def process(self, batch, state: LbState, now: float) -> None:
        call, args = state.bound(self, lb_kernel, self._bind, batch.n)
        batch.n = call.target(batch.pool.data, batch.meta, batch.n, state.bucket_mask,
                              float(now), SWEEP_BATCH if batch.n else SWEEP_TICK, *args)
        if state.flags[0]:
            state.ct.after_batch(1, state.events, now)
