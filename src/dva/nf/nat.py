"""``nat``: IPv4 network address translation between two ports (a bump in the wire).

Ports: the two names in ``ports``, inside first (e.g. ``[inside, outside]``). Frames
are not re-addressed at L2: the NAT sits between a router and the outside link (or
between two routers) and rewrites only IP addresses, TCP/UDP ports and ICMP echo
identifiers, with incremental checksum updates (RFC 1624).

Config::

    type: nat
    ports: [inside, outside]
    snat:                                  # connections opened from inside
      to: 198.51.100.2                     # an address, a list, or a range a-b (a pool)
      ports: 1024-65535                    # external ports (and ICMP identifiers)
      filtering: address-port-dependent    # or endpoint-independent (RFC 4787)
    dnat:                                  # port forwards from outside
      - {proto: tcp, dport: 8080, to: 10.0.0.50:80}    # optional: addr (default any)
      - {proto: udp, dport: 5000-5010, to: 10.0.0.51}  # a range keeps the port
    static:                                # 1:1 NAT, both ways, ports kept
      - {inside: 10.0.0.60, outside: 198.51.100.60}
    hairpin: true                          # inside hosts reach mappings of others
    max_flows: 65536                       # connections (each holds 2 table entries)
    timeouts: {udp: 60}                    # conntrack timeouts (conntrack.DEFAULT_TIMEOUTS)
    filter:                                # optional: rules for new connections
      default: deny                        # allow | deny | reject
      rules:                               # dva.nf.firewall's rules, first match wins
        - {action: allow, from: inside}
        - {action: allow, from: outside, proto: tcp, dst: 10.0.0.50, dport: 80}

Behaviour (drop reasons in ``DROPS``):

* Every IPv4 packet is tracked (:mod:`dva.nf.conntrack`; invalid packets are
  dropped ``invalid``). A connection's translation is decided by its first packet
  and applied to all its packets both ways; its mapping lives as long as it does.
* From inside, a new connection is source-translated: by a ``static`` entry for its
  source (address only), else by ``snat``: **endpoint-independent mapping** (RFC 4787
  REQ-1): an inside (address, port) keeps its external (address, port) for every
  destination while any of its connections lives; **paired pooling** (REQ-2): an
  inside address always gets the same pool address, chosen by a hash of it. The
  external port (ICMP: identifier) is chosen so that the **translated flow stays in
  the flow bucket of the original** (:func:`dva.packet.parse.bucket_port`): replies
  reach the worker that owns the connection's state. Among the ports of that bucket
  class (about range / 4096 of them) the inside port itself is taken when it
  qualifies and is free (port preservation), else a free one from a hashed start;
  none free: ``ports_exhausted`` (counted, no other address is tried but the pool's
  next ones).
* From outside, a new connection to a ``dnat`` port forward or a ``static`` outside
  address is destination-translated; with ``filtering: endpoint-independent`` (REQ-8)
  also one to any live mapping. Anything else passes untranslated (and tracked):
  traffic to the NAT's own address, e.g. the router behind it (unless ``filter``
  says otherwise). With the default address-and-port-dependent filtering, only
  replies of existing connections reach a mapping.
* ``filter`` (a firewall in the NAT: one connection entry, looked up once, both
  filters and translates): a packet that would open a connection is matched against
  the rules (:mod:`dva.nf.firewall`: ``from``, ``src``, ``dst``, ``proto``, ports,
  ``icmp_type``) as the inside sees it, like Linux's forward chain: after destination
  translation (a port forward's or static address's inside target, a hairpinned
  connection's inside target), before source translation (the inside source). The
  first match, else ``default``, decides: ``allow`` goes on as above; ``deny`` drops
  it (``denied``) before any mapping is made; ``reject`` drops it (``rejected``) and
  answers out the ingress port, from the untranslated packet, a TCP RST or an ICMP
  port unreachable (as the firewall does). Packets of an allowed connection (replies,
  RELATED ICMP errors) pass without rules; packets conntrack does not track (ICMP
  other than echo and errors) are matched as they are. Each rule counts its hits.
* A firewall linked straight to the inside port may run in this pass
  (:mod:`dva.worker.fused`; ``FILTER_FRONT``): its rules judge a new connection as
  the firewall sees it (from the inside before any translation, from the outside
  after destination translation, a hairpinned one also as it comes back in) and
  count in its counters.
* Hairpinning (REQ-9): a new connection from inside to an external address of the
  NAT (a mapping, a port forward, a static address) is translated both ways (source
  to its own mapping, destination to the inside target) and sent back inside.
* ICMP errors (RFC 5508): an error about a translated connection is translated back:
  the outer address, the quoted header's address and port (or identifier) and their
  checksums, the ICMP checksum. An error about nothing tracked: ``invalid``.
* ARP passes; other non-IPv4 frames and VLAN-tagged ones: ``unsupported``; parse
  errors ``malformed``; bad IPv4 header checksum ``bad_checksum``; non-first
  fragments (no ports to translate by): ``fragment``.

Limits not hidden: DNAT and static NAT keep ports, so their replies can hash to
another bucket than the original direction (a multi-worker dispatcher must steer
them to the owner); IPv6 is not translated (``unsupported``); fragments are not
reassembled.

State (:class:`NatState`): the connection table (flow state: two entries per
translated connection, the original and the translated tuple) and the mapping table
(shared: inside endpoint <-> external endpoint, for endpoint-independent mapping).
Counters: ``conntrack.CT_EVENTS`` then ``EVENTS``; with a filter also
``FILTER_EVENTS`` (``rst_sent``, ``icmp_sent``, ``pool_exhausted`` (no slot for an
answer), ``default_hits``) and ``ruleN_hits`` for rule N (1-based).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dva._jit import i64, inline_kernel, kernel
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
    UNTRACKED,
    V_FLAGS,
    Conntrack,
    check_timeouts,
    ct_advance,
    ct_classify,
    ct_classify_at,
    ct_copy_values,
    ct_create,
    ct_delete,
    ct_make_key,
    ct_prefetch_ctrl,
    ct_sweep,
    pack32,
    timeouts_array,
)
from dva.nf.firewall import (
    ACTIONS,
    ALLOW,
    DENY,
    R_ACTION,
    R_RULE,
    Rule,
    check_rules,
    compile_rules,
    match_rule,
    send_reject,
)
from dva.nf.table import (
    I_EXPIRED,
    I_LIVE,
    I_MAX,
    HashTable,
    tbl_insert,
    tbl_lookup,
    tbl_needs_rebuild,
    tbl_prefetch_found_ahead,
    tbl_sweep,
)
from dva.nf.xlat import (
    KIND_ORIG,
    KIND_XLAT,
    NUSER,
    SLACK,
    conn_tuples,
    entry_kind,
    entry_ports,
    icmp_error_xlat,
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
from dva.packet.checksum import (
    rd16,
    rd32,
)
from dva.packet.parse import addr_hash, bucket_port, echo_id, l4_ports

DROPS = (
    "malformed",  # a parse error
    "bad_checksum",  # IPv4 header checksum
    "unsupported",  # not IPv4 or ARP (IPv6 included), or VLAN-tagged
    "fragment",  # a non-first fragment: no ports to translate by
    "invalid",  # conntrack: invalid, or an ICMP error about nothing tracked
    "ports_exhausted",  # no free external port (identifier) of the flow's bucket class
    "table_full",  # connection or mapping table full of live entries
    "denied",  # filter: a deny rule, or the default deny
    "rejected",  # filter: a reject rule / default reject (a RST or ICMP error was sent)
)
(D_MALFORMED, D_BAD_CSUM, D_UNSUPPORTED, D_FRAGMENT, D_INVALID, D_EXHAUSTED,
 D_TABLE_FULL, D_DENIED, D_REJECTED) = range(len(DROPS))

EVENTS = ("snat_flows", "dnat_flows", "hairpin_flows", "untranslated_flows",
          "mappings_created", "ports_preserved", "icmp_errors_translated")
NCT = len(CT_EVENTS)
(C_SNAT, C_DNAT, C_HAIRPIN, C_PLAIN, C_MAPPINGS, C_PRESERVED,
 C_ICMP_XLATE) = range(NCT, NCT + len(EVENTS))
# with a filter only: then one hit counter per rule
FILTER_EVENTS = ("rst_sent", "icmp_sent", "pool_exhausted", "default_hits")
C_FRST = NCT + len(EVENTS)  # the three counters of firewall.send_reject, in its order
C_FDEFAULT = C_FRST + 3
C_FRULES = C_FRST + len(FILTER_EVENTS)

NOTES = ("", "translated", "translated back", "untranslated", "new: source NAT",
         "new: destination NAT", "new: hairpin", "new: untranslated", "ARP passes",
         "ICMP error translated", "denied", "rejected: reply sent", "reject reply",
         "hairpin denied (coming back)", "hairpin rejected (coming back): reply sent",
         "reject reply (hairpin)")
(N_FWD, N_BACK, N_PLAIN, N_SNAT, N_DNAT, N_HAIRPIN, N_NEW_PLAIN, N_ARP,
 N_ICMP, N_DENIED, N_REJECTED, N_REPLY, N_HP_DENIED, N_HP_REJECTED,
 N_HP_REPLY) = range(1, len(NOTES))

# conntrack user words: the translated-connection layout of dva.nf.xlat (E1, E2).
MAP_LIFE = 60.0  # a new mapping's first lifetime (its connection refreshes it)
# mapping table: key (type << 40 | zone << 8 | proto, pack32(addr, port)), value (addr,
# port) of the other side. MAP_OUT: inside endpoint -> external; MAP_IN: the reverse.
MAP_OUT, MAP_IN = 0, 1
# cfg[]
G_PLO, G_PHI, G_EIF, G_HAIRPIN, G_SNAT, G_FILTER, G_FDEFAULT = range(7)
# cfg[G_FILTER]: no filter, the NAT's own ``filter``, a firewall's rules run for it
# (dva.worker.fused: a firewall whose port is linked straight to the inside port)
FILTER_NONE, FILTER_OWN, FILTER_FRONT = 0, 1, 2
# fb[]: where the filter counts in its counter array: the three counters of
# firewall.send_reject (in its order), default_hits, rule 1's hits
F_RST, F_DEFAULT, F_RULES = range(3)
# dnat rows: proto, addr (-1 any), port lo, port hi, to addr, to port (-1: kept)
# static rows: inside, outside


# -- config ------------------------------------------------------------------------

def pool_addresses(v: str | list[str]) -> list[int]:
    items = [v] if isinstance(v, str) else v
    out: list[int] = []
    for it in items:
        if "-" in it:
            a, b = it.split("-", 1)
            lo, hi = host_address(a.strip()), host_address(b.strip())
            if hi < lo or hi - lo >= 65536:
                raise ValueError(f"bad address range {it!r}: LO-HI, at most 65536")
            out.extend(range(lo, hi + 1))
        else:
            out.append(host_address(it))
    if len(set(out)) != len(out):
        raise ValueError("an address appears twice in the pool")
    return out


class Snat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str | list[str]
    ports: int | str = "1024-65535"
    filtering: Literal["address-port-dependent", "endpoint-independent"] = \
        "address-port-dependent"

    @field_validator("to")
    @classmethod
    def _to(cls, v):
        if not v:
            raise ValueError("at least one address")
        pool_addresses(v)
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v):
        lo, _ = port_range(v)
        if lo == 0:
            raise ValueError("port 0 cannot be used")
        return v


class Dnat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    proto: Literal["tcp", "udp"]
    dport: int | str
    to: str
    addr: str | None = None

    @field_validator("dport")
    @classmethod
    def _dport(cls, v):
        port_range(v)
        return v

    @field_validator("to")
    @classmethod
    def _to(cls, v):
        a, sep, p = v.partition(":")
        host_address(a)
        if sep:
            if not p.isdigit() or not 1 <= int(p) <= 65535:
                raise ValueError(f"bad port in {v!r}: 1..65535")
        return v

    @field_validator("addr")
    @classmethod
    def _a(cls, v):
        if v is not None:
            host_address(v)
        return v

    @model_validator(mode="after")
    def _one_port(self) -> Dnat:
        lo, hi = port_range(self.dport)
        if lo != hi and ":" in self.to:
            raise ValueError("a port range forwards to an address only (ports are kept)")
        return self

    def row(self) -> tuple[int, ...]:
        lo, hi = port_range(self.dport)
        a, _, p = self.to.partition(":")
        return (L.PROTO_TCP if self.proto == "tcp" else L.PROTO_UDP,
                -1 if self.addr is None else host_address(self.addr), lo, hi, host_address(a),
                int(p) if p else -1)


class Static(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inside: str
    outside: str

    @field_validator("inside", "outside")
    @classmethod
    def _a(cls, v):
        host_address(v)
        return v


class NatFilter(BaseModel):
    """Rules for new connections (:class:`dva.nf.firewall.Rule`), first match wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Literal["allow", "deny", "reject"] = "deny"
    rules: list[Rule] = []


class NatConfig(DeviceConfig):
    type: Literal["nat"]
    ports: list[Name]
    snat: Snat | None = None
    dnat: list[Dnat] = []
    static: list[Static] = []
    hairpin: bool = True
    max_flows: int = Field(default=65536, ge=1, le=MAX_FLOWS_LIMIT // 2)
    timeouts: dict[str, float] = {}
    flush: bool = False  # on a config reload: drop connections instead of keeping them
    filter: NatFilter | None = None

    @field_validator("ports")
    @classmethod
    def _two_ports(cls, v):
        return two_ports(v, "nat", " (inside first)")

    @field_validator("timeouts")
    @classmethod
    def _timeouts(cls, v):
        return check_timeouts(v)

    @model_validator(mode="after")
    def _consistent(self) -> NatConfig:
        ins = [host_address(s.inside) for s in self.static]
        outs = [host_address(s.outside) for s in self.static]
        if len(set(ins)) != len(ins) or len(set(outs)) != len(outs):
            raise ValueError("static: an address is mapped twice")
        if self.snat and set(outs) & set(pool_addresses(self.snat.to)):
            raise ValueError("static: an outside address is also in the snat pool")
        seen: list[tuple[str, int, int, str | None]] = []
        for i, d in enumerate(self.dnat):
            lo, hi = port_range(d.dport)
            for p, a, b, addr in seen:
                if p == d.proto and lo <= b and a <= hi and (addr is None or d.addr is None
                                                              or addr == d.addr):
                    raise ValueError(f"dnat[{i}]: overlaps an earlier port forward")
            seen.append((d.proto, lo, hi, d.addr))
        if self.filter is not None:
            try:
                check_rules(self.filter.rules, self.ports, "nat")
            except ValueError as e:
                raise ValueError(f"filter.{e}") from None
        return self

    def port_names(self) -> list[str]:
        return list(self.ports)


class NatState(DeviceState):
    def __init__(self, config: NatConfig) -> None:
        f = config.filter
        super().__init__(C_FRULES + len(f.rules) if f is not None else NCT + len(EVENTS))
        # Two entries per translated connection.
        self.ct = Conntrack(2 * config.max_flows, user_words=NUSER)
        self.flow_tables["conntrack"] = self.ct.table
        self.maps = HashTable(2, 2, 2 * config.max_flows)
        self.shared_tables["mappings"] = self.maps
        self.key2 = np.zeros(KEY_WORDS, np.int64)
        self.mkey = np.zeros(2, np.int64)
        self.flags = np.zeros(1, np.int64)


# -- kernels ---------------------------------------------------------------------------

@kernel
def _map_key(mkey, kind, zone, proto, addr, port):
    mkey[0] = (kind << 40) | ((zone & 0xFFFFFFFF) << 8) | proto
    mkey[1] = pack32(addr, port)


@kernel
def _alloc(mkeys, mvals, mstate, mbucket, mexp, minfo, mkey, zone, proto, h, hp, pool,
           pool_h, cfg, mask, now, events):
    """External (address, port) for inside endpoint (h, hp): its live mapping, or a
    new one whose port keeps the flow's bucket. Port -1: the bucket class is
    exhausted on every pool address; -2: the mapping table is full."""
    _map_key(mkey, MAP_OUT, zone, proto, h, hp)
    s = tbl_lookup(mkeys, mstate, mexp, minfo, mkey, now)
    if s >= 0:
        return mvals[s, 0], mvals[s, 1]
    hh = addr_hash(h, 0, 0, 0)
    npool = pool.shape[0]
    first = (hh >> 8) % npool  # paired pooling: an inside address, one pool address
    lo = cfg[G_PLO]
    hi = cfg[G_PHI]
    nb = mask + 1
    for t in range(npool):
        k = (first + t) % npool
        if proto == L.PROTO_ICMP:
            cls = echo_id(hh, hp, pool_h[k], mask)
        else:
            cls = bucket_port(hh, hp, pool_h[k], mask)
        j0 = (lo - cls + nb - 1) // nb if lo > cls else 0  # class ports in [lo, hi]
        j1 = (hi - cls) // nb if hi >= cls else -1
        count = j1 - j0 + 1
        if count <= 0:
            continue
        start = ((hh ^ (hp * 0x9E3779B1)) & 0x7FFFFFFF) % count
        for m in range(count + 1):
            if m == 0:  # the inside port itself, when it qualifies (preservation)
                if hp < lo or hp > hi or (hp & mask) != cls:
                    continue
                port = hp
            else:
                port = cls + (j0 + (start + m - 1) % count) * nb
            _map_key(mkey, MAP_IN, zone, proto, pool[k], port)
            if tbl_lookup(mkeys, mstate, mexp, minfo, mkey, now) >= 0:
                continue
            if minfo[I_LIVE] + 2 > minfo[I_MAX]:
                return pool[k], -2
            s = tbl_insert(mkeys, mstate, mbucket, mexp, minfo, mkey, -1, now + MAP_LIFE,
                           now)
            mvals[s, 0] = h
            mvals[s, 1] = hp
            _map_key(mkey, MAP_OUT, zone, proto, h, hp)
            s = tbl_insert(mkeys, mstate, mbucket, mexp, minfo, mkey, -1, now + MAP_LIFE,
                           now)
            mvals[s, 0] = pool[k]
            mvals[s, 1] = port
            events[C_MAPPINGS] += 1
            if port == hp:
                events[C_PRESERVED] += 1
            return pool[k], port
    return 0, -1


@kernel
def _filter(rules, cfg, fev, fb, inp, proto, src, dst, sport, dport, itype):
    """The filter's action (firewall ALLOW, DENY, REJECT) for a new connection;
    counts the hit in ``fev`` (``fb``: the indices of its counters, ``F_*``)."""
    j = match_rule(rules, inp, proto, src, dst, sport, dport, itype)
    if j >= 0:
        fev[fb[F_RULES] + rules[j, R_RULE]] += 1
        return rules[j, R_ACTION]
    fev[fb[F_DEFAULT]] += 1
    return cfg[G_FDEFAULT]


@kernel
def _dnat_target(dnat, proto, da, dp):
    """Index of the port forward for (proto, dst addr, dst port), or -1."""
    for j in range(dnat.shape[0]):
        if dnat[j, 0] == proto and (dnat[j, 1] < 0 or dnat[j, 1] == da) \
                and dp >= dnat[j, 2] and dp <= dnat[j, 3]:
            return j
    return -1


@kernel
def _static_of(static, col, a):
    for j in range(static.shape[0]):
        if static[j, col] == a:
            return j
    return -1


@kernel
def _is_external(pool, static, dnat, a):
    for j in range(pool.shape[0]):
        if pool[j] == a:
            return True
    for j in range(dnat.shape[0]):
        if dnat[j, 1] == a:
            return True
    return _static_of(static, 1, a) >= 0


@kernel
def _inbound_target(mkeys, mvals, mstate, mexp, minfo, mkey, pool, static, dnat, eif,
                    zone, proto, da, dp, now):
    """Where a new connection to (da, dp) from outside (or hairpinned) goes: (addr,
    port), (da, dp) itself when nothing maps it."""
    j = _dnat_target(dnat, proto, da, dp)
    if j >= 0:
        return dnat[j, 4], (dp if dnat[j, 5] < 0 else dnat[j, 5])
    st = _static_of(static, 1, da)
    if st >= 0:
        return static[st, 0], dp
    if eif:
        _map_key(mkey, MAP_IN, zone, proto, da, dp)
        m = tbl_lookup(mkeys, mstate, mexp, minfo, mkey, now)
        if m >= 0:
            return mvals[m, 0], mvals[m, 1]
    return da, dp


@inline_kernel
def _refresh(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo, key2, mkey,
             e1, zone, proto, now):
    """Keep E2 and the mapping of connection ``e1`` alive as long as it
    (:func:`dva.nf.xlat.refresh_due`: inlined, since it runs on every packet; the
    extension itself, about once per margin, is a call)."""
    exp = refresh_due(vals, expires, e1, now)
    if exp >= 0.0:
        _extend(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo, key2, mkey,
                e1, zone, proto, exp, now)


@kernel
def _extend(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo, key2, mkey,
            e1, zone, proto, exp, now):
    """Make E2 and the mapping of connection ``e1`` live until ``exp``."""
    touch_e2(keys, state, expires, info, vals, key2, e1, zone, proto, exp, now)
    os_, osp, _, _, ts, tsp, _, _ = conn_tuples(keys, vals, e1)
    if os_ != ts or osp != tsp:
        for kind in range(2):
            if kind == MAP_OUT:
                _map_key(mkey, kind, zone, proto, os_, osp)
            else:
                _map_key(mkey, kind, zone, proto, ts, tsp)
            m = tbl_lookup(mkeys, mstate, mexp, minfo, mkey, now)
            if m >= 0 and mexp[m] < exp:
                mexp[m] = exp


@kernel
def _filter_new(rules, cfg, fev, fb, pkt, l4, inp, proto, sa, sp, da, dp):
    """:func:`_filter` for a new tracked connection (ICMP: its type, no ports)."""
    if proto == L.PROTO_ICMP:
        return _filter(rules, cfg, fev, fb, inp, proto, sa, da, 0, 0, i64(pkt[l4]))
    return _filter(rules, cfg, fev, fb, inp, proto, sa, da, sp, dp, -1)


@kernel
def _new_conn(data, row, keys, vals, state, bucket, expires, info, mkeys, mvals, mstate,
              mbucket, mexp, minfo, key, key2, mkey, pool, pool_h, static, dnat, cfg,
              mask, a_is_src, timeouts, events, now, c, rules, fev, fb):
    """Create the connection of a NEW packet and decide its translation (and rewrite
    the packet); ``c``: E1's candidate slot (:func:`dva.nf.conntrack.ct_create`).
    ``rules``: the filter's (``cfg[G_FILTER]``), applied before any entry is made
    (:data:`FILTER_OWN`: as the inside sees the connection; :data:`FILTER_FRONT`: as
    a firewall in front of the inside port sees it, the hairpinned connection a
    second time as it comes back from the NAT). Returns (E1 slot, note), or (-1 -
    drop reason, 1 if the hairpinned connection's second check refused it else 0)."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    end = l3 + rd16(pkt, l3 + 2)
    proto = row[L.PROTO]
    zone = row[L.TENANT]
    inp = row[L.IN_PORT]
    sa, sp, da, dp = packet_tuple(pkt, l3, l4, end, proto)
    nsa, nsp, nda, ndp = sa, sp, da, dp
    outp = 1 - inp
    note = N_NEW_PLAIN
    ported = proto == L.PROTO_TCP or proto == L.PROTO_UDP or proto == L.PROTO_ICMP
    if inp == 0:
        if cfg[G_HAIRPIN] and _is_external(pool, static, dnat, da):
            nda, ndp = _inbound_target(mkeys, mvals, mstate, mexp, minfo, mkey, pool,
                                       static, dnat, True, zone, proto, da, dp, now)
            if nda != da or ndp != dp:
                outp = 0
                note = N_HAIRPIN
        if cfg[G_FILTER]:
            # own filter: the inside target; a firewall in front: the packet as it is
            fda, fdp = (nda, ndp) if cfg[G_FILTER] == FILTER_OWN else (da, dp)
            action = _filter_new(rules, cfg, fev, fb, pkt, l4, inp, proto, sa, sp, fda, fdp)
            if action != ALLOW:
                return -1 - (D_DENIED if action == DENY else D_REJECTED), 0
        st = _static_of(static, 0, sa)
        if st >= 0:
            nsa = static[st, 1]
        elif cfg[G_SNAT] and ported:
            nsa, nsp = _alloc(mkeys, mvals, mstate, mbucket, mexp, minfo, mkey, zone,
                              proto, sa, sp, pool, pool_h, cfg, mask, now, events)
            if nsp == -1:
                return -1 - D_EXHAUSTED, 0
            if nsp == -2:
                return -1 - D_TABLE_FULL, 0
        if note != N_HAIRPIN and (nsa != sa or nsp != sp):
            note = N_SNAT
        if note == N_HAIRPIN and cfg[G_FILTER] == FILTER_FRONT:
            # the firewall in front sees the hairpinned connection come back from
            # the NAT's inside port, translated both ways
            action = _filter_new(rules, cfg, fev, fb, pkt, l4, 1, proto, nsa, nsp, nda, ndp)
            if action != ALLOW:
                return -1 - (D_DENIED if action == DENY else D_REJECTED), 1
    else:
        nda, ndp = _inbound_target(mkeys, mvals, mstate, mexp, minfo, mkey, pool, static,
                                   dnat, cfg[G_EIF] != 0, zone, proto, da, dp, now)
        if cfg[G_FILTER]:
            action = _filter_new(rules, cfg, fev, fb, pkt, l4, inp, proto, sa, sp, nda, ndp)
            if action != ALLOW:
                return -1 - (D_DENIED if action == DENY else D_REJECTED), 0
        if nda != da or ndp != dp:
            note = N_DNAT
    if proto == L.PROTO_ICMP:
        ndp = nsp  # an echo's identifier is one value, both ways
    if not ported:
        nsp = 0
        ndp = 0
    e1 = ct_create(keys, vals, state, bucket, expires, info, key, a_is_src, data, row, 0,
                   timeouts, events, 0, now, c)
    if e1 < 0:
        return -1 - D_TABLE_FULL, 0
    # E1's key is O (sa, sp, da, dp), as the packet came
    set_meta(vals, e1, KIND_ORIG, inp | (outp << 8))
    set_x(vals, e1, nsa, nsp, nda, ndp)
    if note == N_NEW_PLAIN:
        events[C_PLAIN] += 1
        return e1, note
    a2 = ct_make_key(key2, zone, proto, nsa, nsp, nda, ndp)
    e2 = tbl_lookup(keys, state, expires, info, key2, now)
    if e2 < 0:
        e2 = tbl_insert(keys, state, bucket, expires, info, key2, row[L.BUCKET],
                        expires[e1] + SLACK, now)
    if e2 < 0:
        ct_delete(state, info, e1)
        return -1 - D_TABLE_FULL, 0
    ct_copy_values(vals, e1, e2, proto)
    vals[e2, V_FLAGS] = F_ORIG_A if a2 else 0
    set_meta(vals, e2, KIND_XLAT, inp | (outp << 8))
    set_x(vals, e2, sa, sp, da, dp)  # E2's key is T
    expires[e2] = expires[e1] + SLACK
    # E1's refresh time is 0 (due): the mapping gets the connection's lifetime now
    _refresh(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo, key2, mkey, e1,
             zone, proto, now)
    translate_first(pkt, l3, l4, end, proto, sa, sp, da, dp, nsa, nsp, nda, ndp)
    if note == N_SNAT:
        events[C_SNAT] += 1
    elif note == N_DNAT:
        events[C_DNAT] += 1
    else:
        events[C_HAIRPIN] += 1
    return e1, note


@kernel
def _e1_live(keys, vals, state, expires, info, key2, e2, zone, now):
    """Whether the connection whose E2 is ``e2`` still lives (its E1)."""
    sa, sp, da, dp = x_tuple(vals, e2)  # an E2 keeps O
    ct_make_key(key2, zone, (keys[e2, 1] >> 32) & 0xFF, sa, sp, da, dp)
    e1 = tbl_lookup(keys, state, expires, info, key2, now)
    return e1 >= 0 and entry_kind(vals, e1) == KIND_ORIG


@kernel
def _filter_untracked(rules, cfg, fev, fb, data, row):
    """:func:`_filter` for a packet conntrack does not track (judged as it is)."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    proto = row[L.PROTO]
    sport, dport = l4_ports(pkt, l4, proto)
    itype = i64(pkt[l4]) if proto == L.PROTO_ICMP else -1
    return _filter(rules, cfg, fev, fb, row[L.IN_PORT], proto, rd32(pkt, l3 + 12),
                   rd32(pkt, l3 + 16), sport, dport, itype)


@kernel
def _refuse(data, free, top, meta, i, total, headroom, fev, fb, reason, again):
    """Drop row ``i`` for the filter (``D_DENIED`` or ``D_REJECTED``, which appends
    the answer); ``again``: by the second check of a hairpinned connection (noted
    apart). Returns the row count."""
    if reason == D_REJECTED:
        total = send_reject(data, free, top, meta, i, total, headroom, fev, fb[F_RST],
                            N_HP_REPLY if again else N_REPLY)
        meta[i, L.NOTE] = N_HP_REJECTED if again else N_REJECTED
    else:
        meta[i, L.NOTE] = N_HP_DENIED if again else N_DENIED
    meta[i, L.VERDICT] = drop_code(reason)
    return total


@kernel
def nat_kernel(data, free, top, headroom, meta, n, mask, now, sweep, keys, vals, state,
               bucket, expires, info, mkeys, mvals, mstate, mbucket, mexp, minfo, key, key2,
               mkey, hints, pool, pool_h, static, dnat, cfg, rules, fev, fb, timeouts, events,
               flags):
    """Decide and translate rows [0, n); append the filter's reject answers. Returns
    the row count; ``flags[0]``: bit 0, the connection table wants a rebuild
    (:func:`dva.nf.conntrack.ct_sweep`), bit 1 the mapping table (tombstones fill a
    quarter of it). ``fev``/``fb``: where the filter counts (:func:`_filter`)."""
    total = n
    expired_before = info[I_EXPIRED]
    ct_prefetch_ctrl(state, info, key, data, meta, n, hints)
    # Without port forwards and static mappings (whose inside hosts' replies find a
    # translated tuple's entry, E2, from the inside), only rows from the outside
    # find E2s (and hairpinned ones, which lose the hint): inside rows skip the
    # check, which read their candidate's record before it had arrived (2 to 6% of
    # natf_est, docs/benchmarks.md)
    e2_port = 1 if dnat.shape[0] == 0 and static.shape[0] == 0 else -1
    for i in range(n):
        tbl_prefetch_found_ahead(state, expires, hints, i, n)  # hints[i]: a candidate
        prefetch_e1_ahead(meta, i, n, state, vals, expires, key2, e2_port, hints)
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
        if row[L.PFLAGS] & L.F_LATER_FRAG:
            row[L.VERDICT] = drop_code(D_FRAGMENT)
            continue
        r, e, d = ct_classify_at(keys, state, vals, expires, info, key, data, row, events,
                                 0, now, hints[i])
        if r == RELATED:
            if entry_kind(vals, e) == KIND_XLAT and not _e1_live(
                    keys, vals, state, expires, info, key2, e, row[L.TENANT], now):
                # E2 outlives its connection a little (SLACK): the error is about
                # a connection that is gone
                row[L.VERDICT] = drop_code(D_INVALID)
                continue
            row[L.VERDICT] = icmp_error_xlat(data, row, keys, vals, e)
            row[L.NOTE] = N_ICMP
            events[C_ICMP_XLATE] += 1
            continue
        if r == INVALID:
            row[L.VERDICT] = drop_code(D_INVALID)
            continue
        if r == UNTRACKED:
            if cfg[G_FILTER]:
                action = _filter_untracked(rules, cfg, fev, fb, data, row)
                if action != ALLOW:
                    total = _refuse(data, free, top, meta, i, total, headroom, fev, fb,
                                    D_DENIED if action == DENY else D_REJECTED, 0)
                    continue
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_PLAIN
            continue
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + row[L.LEN]]
        l3 = row[L.L3_OFF]
        l4 = row[L.L4_OFF]
        end = l3 + rd16(pkt, l3 + 2)
        proto = row[L.PROTO]
        zone = row[L.TENANT]
        if r == FOUND and entry_kind(vals, e) == KIND_XLAT:
            # a packet of the translated tuple: back to the original one, then the
            # connection's own entry (E1) judges it
            e2 = e
            translate(pkt, l3, l4, end, proto, keys, vals, e2, False)
            ports = entry_ports(vals, e2)
            r, e, d = ct_classify(keys, state, vals, expires, info, key, data, row, events,
                                  0, now)
            if r != FOUND or entry_kind(vals, e) != KIND_ORIG:
                row[L.VERDICT] = drop_code(D_INVALID)  # the connection is gone
                continue
            if ct_advance(vals, expires, e, d, data, row, timeouts, events, 0, now) \
                    != ESTABLISHED:
                row[L.VERDICT] = drop_code(D_INVALID)
                continue
            _refresh(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo, key2,
                     mkey, e, zone, proto, now)
            row[L.VERDICT] = (ports & 0xFF) if d == 1 else ((ports >> 8) & 0xFF)
            row[L.NOTE] = N_BACK
            continue
        if r == FOUND:
            a = ct_advance(vals, expires, e, d, data, row, timeouts, events, 0, now)
            if a == INVALID:
                row[L.VERDICT] = drop_code(D_INVALID)
                continue
            if a == REOPEN:
                # a new connection on a closed one's ports: forget it (E2 expires soon)
                ct_delete(state, info, e)
                r, e, d = ct_classify(keys, state, vals, expires, info, key, data, row,
                                      events, 0, now)
            else:
                ports = entry_ports(vals, e)
                os_, osp, od, odp, ts, tsp, td, tdp = conn_tuples(keys, vals, e)
                if os_ != ts or osp != tsp or od != td or odp != tdp:  # translated
                    if d == 1:
                        row[L.VERDICT] = drop_code(D_INVALID)  # a reply not to the mapping
                        continue
                    translate(pkt, l3, l4, end, proto, keys, vals, e, True)
                    _refresh(keys, vals, state, expires, info, mkeys, mstate, mexp, minfo,
                             key2, mkey, e, zone, proto, now)
                    row[L.NOTE] = N_FWD
                else:
                    row[L.NOTE] = N_PLAIN
                row[L.VERDICT] = ((ports >> 8) & 0xFF) if d == 0 else (ports & 0xFF)
                continue
        if r != NEW:
            row[L.VERDICT] = drop_code(D_INVALID)
            continue
        e, note = _new_conn(data, row, keys, vals, state, bucket, expires, info, mkeys,
                            mvals, mstate, mbucket, mexp, minfo, key, key2, mkey, pool,
                            pool_h, static, dnat, cfg, mask, d, timeouts, events, now,
                            hints[i], rules, fev, fb)
        if e < 0:
            if -1 - e == D_DENIED or -1 - e == D_REJECTED:
                total = _refuse(data, free, top, meta, i, total, headroom, fev, fb, -1 - e,
                                note)
            else:
                row[L.VERDICT] = drop_code(-1 - e)
            continue
        row[L.VERDICT] = (entry_ports(vals, e) >> 8) & 0xFF
        row[L.NOTE] = note
    rebuild = ct_sweep(state, expires, info, events, 0, now, sweep, expired_before)
    tbl_sweep(mstate, mexp, minfo, now, sweep)
    if tbl_needs_rebuild(mstate, minfo):
        rebuild |= 2
    flags[0] = rebuild
    return total


# -- device ----------------------------------------------------------------------------

class Nat(Device):
    type_name = "nat"
    config_model = NatConfig
    drop_reasons = DROPS
    counters = CT_EVENTS + EVENTS
    notes = NOTES
    ticks = True  # expiry goes on while no packet comes

    def __init__(self, name: str, config: NatConfig) -> None:
        super().__init__(name, config)
        sn = config.snat
        pool = pool_addresses(sn.to) if sn else []
        self.pool = np.array(pool, np.int64)
        self.pool_h = np.array([int(addr_hash(a, 0, 0, 0)) for a in pool], np.int64)
        self.static = np.array([(host_address(s.inside), host_address(s.outside)) for s in config.static],
                               np.int64).reshape(-1, 2)
        self.dnat = np.array([d.row() for d in config.dnat], np.int64).reshape(-1, 6)
        lo, hi = port_range(sn.ports) if sn else (1024, 65535)
        f = config.filter
        self.cfg = np.array([lo, hi, bool(sn and sn.filtering == "endpoint-independent"),
                             config.hairpin, sn is not None, f is not None,
                             ACTIONS[f.default] if f else 0], np.int64)
        self.rules = compile_rules(f.rules if f else [], config.ports)
        self.fbase = np.array([C_FRST, C_FDEFAULT, C_FRULES], np.int64)
        if f is not None:
            self.max_emit = 1  # a reject answer per input row
            self.counters = CT_EVENTS + EVENTS + FILTER_EVENTS + tuple(
                f"rule{i + 1}_hits" for i in range(len(f.rules)))
        self.timeouts = timeouts_array(config.timeouts)
        self.flush_on_reload = config.flush

    def bucket_aliases(self) -> list[tuple[int, ...]]:
        """A port forward's public endpoint stands for its inside target (the public
        address may be any, so the inside one is canonical); a static outside address
        for its inside address, every protocol and port."""
        c = self.config
        rows = [d.row() for d in c.dnat]
        rows += [(-1, host_address(m.outside), 0, 65535, host_address(m.inside), -1)
                 for m in c.static]
        return rows

    def new_state(self) -> NatState:
        return NatState(self.config)

    def describe(self) -> str:
        sn = self.config.snat
        return (f"{self.name} ({self.type_name}: snat "
                f"{'to ' + str(sn.to) if sn else 'off'}, {len(self.config.dnat)} port "
                f"forwards, {len(self.config.static)} static)")

    def _bind(self, state: NatState, rows: int) -> tuple[tuple, int]:
        """nat_kernel's arguments that stay the same (:meth:`DeviceState.bound`)."""
        return self.bind_with(state, rows, self.cfg, self.rules, state.events, self.fbase)

    def bind_with(self, state: NatState, rows: int, cfg, rules, fev, fbase
                  ) -> tuple[tuple, int]:
        """:meth:`_bind` with another filter: ``cfg``, ``rules``, and where its
        counters are (``fev``, ``fbase``: :func:`_filter`)."""
        t, m = state.ct.table, state.maps
        hints = state.scratch(rows, "hints")
        return (t.keys, t.vals, t.state, t.bucket, t.expires, t.info, m.keys, m.vals,
                m.state, m.bucket, m.expires, m.info, state.ct.key, state.key2, state.mkey,
                hints, self.pool, self.pool_h, self.static, self.dnat, cfg, rules, fev,
                fbase, self.timeouts, state.events, state.flags), len(hints)

    def process(self, batch, state: NatState, now: float) -> None:
        self.run(self, batch, state, now, self._bind)

    def run(self, owner, batch, state: NatState, now: float, build) -> None:
        """nat_kernel over ``batch`` with the arguments ``build`` gives (bound once
        for ``owner``: :meth:`DeviceState.bound`), then the tables' upkeep."""
        call, args = state.bound(owner, nat_kernel, build, batch.n)
        pool = batch.pool
        batch.n = call.target(pool.data, pool.free, pool.top, pool.headroom, batch.meta,
                              batch.n, state.bucket_mask, float(now),
                              SWEEP_BATCH if batch.n else SWEEP_TICK, *args)
        rebuild = state.flags[0]
        if rebuild:
            state.ct.after_batch(rebuild & 1, state.events, now)
            if rebuild & 2:
                state.maps.rebuild(now)
