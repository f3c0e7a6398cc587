"""``firewall``: a stateful IPv4 packet filter between two ports (a bump in the wire).

Ports: the two names in ``ports`` (e.g. ``[inside, outside]``); what passes leaves by
the other port, unchanged (no MAC or IP rewrite: the firewall has no address).

Config::

    type: firewall
    ports: [inside, outside]
    default: deny                # allow | deny | reject: when no rule matches
    rules:                       # first match wins; only for packets opening a flow
      - {action: allow, from: inside}
      - {action: allow, from: outside, proto: tcp, dst: 10.0.0.0/24, dport: 22}
      - {action: reject, proto: udp, dport: 5000-5100}
      - {action: allow, proto: icmp, icmp_type: 8, src: [192.0.2.0/24, 198.51.100.7]}
    max_flows: 262144            # connection table limit (1 .. 16777216)
    timeouts: {tcp_established: 3600}   # seconds, any of conntrack.DEFAULT_TIMEOUTS
    fragments: drop              # non-first fragments (no ports to match): drop | allow
    invalid: drop                # packets conntrack finds invalid: drop | allow

A rule matches on ``from`` (the port the packet arrived on; ``any``, the default),
``src`` / ``dst`` (a CIDR or address, or a list of them; default any), ``proto``
(``tcp``, ``udp``, ``icmp``, a number 0-255, or ``any``), ``sport`` / ``dport`` (a
port or ``lo-hi`` range; TCP and UDP rules only) and ``icmp_type`` (ICMP rules only).
Rejected, each at its path: unknown ports or keys, CIDRs with host bits set, port
ranges outside 0-65535 or reversed, port or ICMP matches on a protocol without them,
more than ``MAX_RULES`` rules after expanding lists.

Behaviour, per frame (drop reasons in ``DROPS``):

* ARP passes (the hosts on both sides resolve each other); any other non-IPv4 frame
  (IPv6 included) or a VLAN-tagged one: ``unsupported``. Parse errors: ``malformed``;
  a bad IPv4 header checksum: ``bad_checksum``; a non-first fragment: ``fragment``
  (or passed, with ``fragments: allow``).
* Connection tracking (:mod:`dva.nf.conntrack`): a packet of a tracked connection
  passes in both directions (replies need no rule); an ICMP error quoting a tracked
  connection passes (RELATED); an invalid packet (bad TCP flags or state, outside
  the TCP window, an ICMP error about nothing tracked, an echo reply or a non-SYN TCP
  segment with no connection) is dropped ``invalid`` (or passed, ``invalid: allow``).
* A packet that opens a connection (or an ICMP message that is neither echo nor an
  error, which is filtered without state) is matched against the rules in order;
  the first match, else ``default``, decides: ``allow`` creates the connection entry
  (table full and nothing evictable: ``table_full``); ``deny`` drops it (``denied``);
  ``reject`` drops it (``rejected``) and answers out the ingress port: a TCP RST
  (RFC 793 reset generation; none to a RST) or an ICMP port unreachable (3/3) from
  the packet's destination address quoting its header and up to 548 bytes (none
  about broadcast or multicast destinations). Each rule counts its hits.
* A SYN on a connection in TIME_WAIT or CLOSE opens a new connection (rules again).

Changing the rules (a new config generation) keeps existing connections: the state
moves to the new device whole (``export_flows``/``import_flows``); ``flush: true`` in
the new config drops them instead (every connection must then pass the new rules).

A firewall whose port is linked straight to a NAT's inside port runs fused with it
(:mod:`dva.worker.fused`): the NAT's one connection table and pass, these rules
judging each new connection as this device would, the counters kept as the two
devices' (the conntrack ones but for the NAT's); the module says when a pair is not
fused.

State (:class:`FirewallState`): the connection table (flow state, by bucket).
Counters: ``conntrack.CT_EVENTS``, then ``rst_sent``, ``icmp_sent``,
``pool_exhausted``, ``default_hits``, and ``ruleN_hits`` for rule N (1-based).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dva._jit import i64, kernel
from dva.nf.base import (
    Device,
    DeviceConfig,
    DeviceState,
    Name,
    drop_code,
    port_range,
    two_ports,
)
from dva.nf.conntrack import (
    CT_EVENTS,
    ESTABLISHED,
    F_ORIG_A,
    INVALID,
    MAX_FLOWS_LIMIT,
    NEW,
    RELATED,
    REOPEN,
    SWEEP_BATCH,
    SWEEP_TICK,
    V_FLAGS,
    Conntrack,
    check_timeouts,
    ct_create,
    ct_delete,
    ct_packet,
    ct_prefetch_ctrl,
    ct_sweep,
    timeouts_array,
)
from dva.nf.table import I_EXPIRED, tbl_prefetch_found_ahead
from dva.packet import layout as L
from dva.packet.batch import NO_SLOT, row_copy, take_slot
from dva.packet.checksum import (
    csum_add,
    csum_fold,
    ipv4_header_checksum,
    pseudo_header_sum,
    rd16,
    rd32,
    rd48,
    wr16,
    wr32,
    wr48,
)
from dva.packet.parse import l4_ports

DROPS = (
    "malformed",  # a parse error
    "bad_checksum",  # IPv4 header checksum
    "unsupported",  # not IPv4 or ARP (IPv6 included), or VLAN-tagged
    "fragment",  # a non-first fragment (fragments: drop)
    "invalid",  # conntrack: invalid for its connection, or no connection to belong to
    "denied",  # a deny rule, or the default policy deny
    "rejected",  # a reject rule / default reject (a RST or ICMP error was sent)
    "table_full",  # allowed, but the connection table is full of assured connections
)
(D_MALFORMED, D_BAD_CSUM, D_UNSUPPORTED, D_FRAGMENT, D_INVALID, D_DENIED, D_REJECTED,
 D_TABLE_FULL) = range(len(DROPS))

OWN_EVENTS = ("rst_sent", "icmp_sent", "pool_exhausted", "default_hits")
NCT = len(CT_EVENTS)
C_RST, C_ICMP, C_POOL, C_DEFAULT = range(NCT, NCT + len(OWN_EVENTS))
C_RULES = NCT + len(OWN_EVENTS)  # ruleN_hits from here

NOTES = ("", "established", "related", "new: allowed by a rule", "new: allowed by default",
         "denied", "rejected: reply sent", "invalid", "ARP passes", "fragment",
         "untracked: allowed", "reject reply")
(N_EST, N_RELATED, N_RULE, N_DEFAULT, N_DENIED, N_REJECTED, N_INVALID, N_ARP, N_FRAG,
 N_UNTRACKED, N_REPLY) = range(1, len(NOTES))

ALLOW, DENY, REJECT = 0, 1, 2
ACTIONS = {"allow": ALLOW, "deny": DENY, "reject": REJECT}
MAX_RULES = 65536
QUOTE_MAX = 576 - 20 - 8
# compiled rule columns
(R_FROM, R_SRC, R_SMASK, R_DST, R_DMASK, R_PROTO, R_SPLO, R_SPHI, R_DPLO, R_DPHI, R_ITYPE,
 R_ACTION, R_RULE) = range(13)
NRCOLS = 13
# cfg[] columns
G_DEFAULT, G_FRAG_ALLOW, G_INVALID_ALLOW = 0, 1, 2
PROTOS = {"any": -1, "tcp": L.PROTO_TCP, "udp": L.PROTO_UDP, "icmp": L.PROTO_ICMP}


# -- config ------------------------------------------------------------------------

def _net(v: str) -> tuple[int, int]:
    try:
        n = ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"bad address or CIDR {v!r}: {e}") from None
    return int(n.network_address), int(n.netmask)


class Rule(BaseModel):
    """One filter rule (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    action: Literal["allow", "deny", "reject"]
    from_: Name | Literal["any"] = Field(default="any", alias="from")
    src: str | list[str] = "any"
    dst: str | list[str] = "any"
    proto: Literal["any", "tcp", "udp", "icmp"] | int = "any"
    sport: int | str | None = None
    dport: int | str | None = None
    icmp_type: int | None = Field(default=None, ge=0, le=255)

    @field_validator("src", "dst")
    @classmethod
    def _cidrs(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("an empty address list matches nothing; leave it out for any")
        for it in items:
            if it != "any":
                _net(it)
        return v

    @field_validator("proto")
    @classmethod
    def _proto(cls, v):
        if isinstance(v, int) and not 0 <= v <= 255:
            raise ValueError(f"bad protocol {v}: 0..255 or tcp, udp, icmp, any")
        return v

    @field_validator("sport", "dport")
    @classmethod
    def _ports(cls, v):
        if v is not None:
            port_range(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        p = PROTOS.get(self.proto, self.proto) if isinstance(self.proto, str) else self.proto
        if (self.sport is not None or self.dport is not None) \
                and p not in (L.PROTO_TCP, L.PROTO_UDP):
            raise ValueError("sport/dport need proto tcp or udp")
        if self.icmp_type is not None and p != L.PROTO_ICMP:
            raise ValueError("icmp_type needs proto icmp")
        return self

    def proto_number(self) -> int:
        return PROTOS[self.proto] if isinstance(self.proto, str) else self.proto

    def nets(self, which: str) -> list[tuple[int, int]]:
        v = getattr(self, which)
        items = [v] if isinstance(v, str) else v
        return [(0, 0) if it == "any" else _net(it) for it in items]


class FirewallConfig(DeviceConfig):
    type: Literal["firewall"]
    ports: list[Name]
    default: Literal["allow", "deny", "reject"] = "deny"
    rules: list[Rule] = []
    max_flows: int = Field(default=262144, ge=1, le=MAX_FLOWS_LIMIT)
    timeouts: dict[str, float] = {}
    flush: bool = False  # on a config reload: drop connections instead of keeping them
    fragments: Literal["drop", "allow"] = "drop"
    invalid: Literal["drop", "allow"] = "drop"

    @field_validator("ports")
    @classmethod
    def _two_ports(cls, v):
        return two_ports(v, "firewall")

    @field_validator("timeouts")
    @classmethod
    def _timeouts(cls, v):
        return check_timeouts(v)

    @model_validator(mode="after")
    def _rules(self) -> FirewallConfig:
        check_rules(self.rules, self.ports, "firewall")
        return self

    def port_names(self) -> list[str]:
        return list(self.ports)


def check_rules(rules: list[Rule], ports: list[str], what: str) -> None:
    """Rules name ports of the device (``what``: its type, for the message) and
    expand to at most ``MAX_RULES`` rows."""
    for i, r in enumerate(rules):
        if r.from_ != "any" and r.from_ not in ports:
            raise ValueError(f"rules[{i}]: from {r.from_!r} is not a port of this "
                             f"{what} ({', '.join(ports)})")
    rows = sum(len(r.nets("src")) * len(r.nets("dst")) for r in rules)
    if rows > MAX_RULES:
        raise ValueError(f"{rows} rules after expanding address lists; at most "
                         f"{MAX_RULES}")


def compile_rules(rules: list[Rule], ports: list[str]) -> np.ndarray:
    """One row per (rule, src net, dst net): the matcher's table."""
    rows = []
    for n, r in enumerate(rules):
        frm = -1 if r.from_ == "any" else ports.index(r.from_)
        sp = port_range(r.sport) if r.sport is not None else (0, 65535)
        dp = port_range(r.dport) if r.dport is not None else (0, 65535)
        it = -1 if r.icmp_type is None else r.icmp_type
        for s, sm in r.nets("src"):
            for d, dm in r.nets("dst"):
                rows.append((frm, s, sm, d, dm, r.proto_number(), sp[0], sp[1], dp[0],
                             dp[1], it, ACTIONS[r.action], n))
    return np.array(rows, np.int64).reshape(-1, NRCOLS)


class FirewallState(DeviceState):
    def __init__(self, config: FirewallConfig) -> None:
        super().__init__(C_RULES + len(config.rules))
        self.ct = Conntrack(config.max_flows)
        self.flow_tables["conntrack"] = self.ct.table
        self.flags = np.zeros(1, np.int64)  # kernel -> process(): rebuild the table


# -- kernels ---------------------------------------------------------------------------

@kernel
def match_rule(rules, inp, proto, src, dst, sport, dport, itype):
    """Index of the first matching compiled rule, or -1."""
    for j in range(rules.shape[0]):
        if rules[j, R_FROM] >= 0 and rules[j, R_FROM] != inp:
            continue
        if (src & rules[j, R_SMASK]) != rules[j, R_SRC] \
                or (dst & rules[j, R_DMASK]) != rules[j, R_DST]:
            continue
        p = rules[j, R_PROTO]
        if p >= 0:
            if p != proto:
                continue
            if sport < rules[j, R_SPLO] or sport > rules[j, R_SPHI] \
                    or dport < rules[j, R_DPLO] or dport > rules[j, R_DPHI]:
                continue
            if rules[j, R_ITYPE] >= 0 and itype != rules[j, R_ITYPE]:
                continue
        return j
    return -1


@kernel
def send_reject(data, free, top, meta, i, total, headroom, events, ev, note):
    """Append the answer to rejected row ``i`` (a TCP RST or an ICMP port
    unreachable), out the ingress port, noted ``note``; returns the row count.
    Counted at ``events[ev]`` (RST sent), ``ev + 1`` (ICMP sent), ``ev + 2`` (no
    slot for it)."""
    row = meta[i]
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    proto = row[L.PROTO]
    src = rd32(pkt, l3 + 12)
    dst = rd32(pkt, l3 + 16)
    if proto == L.PROTO_TCP and i64(pkt[l4 + 13]) & 4:
        return total  # never a RST to a RST
    if (dst >> 28) == 14 or dst == 0xFFFFFFFF or (rd48(pkt, 0) >> 40) & 1:
        return total  # nothing answers a broadcast or multicast
    c = take_slot(free, top, meta, total)
    if c < 0:
        if c == NO_SLOT:  # (max_emit = 1 keeps a row free for the answer)
            events[ev + 2] += 1
        return total
    buf = data[c]
    h = headroom
    wr48(buf, h, rd48(pkt, 6))
    wr48(buf, h + 6, rd48(pkt, 0))
    wr16(buf, h + 12, L.ETH_IPV4)
    ip = h + 14
    buf[ip] = 0x45
    buf[ip + 1] = 0
    wr16(buf, ip + 4, 0)
    wr16(buf, ip + 6, 0x4000)  # DF
    buf[ip + 8] = 64
    wr32(buf, ip + 12, dst)
    wr32(buf, ip + 16, src)
    t = ip + 20
    if proto == L.PROTO_TCP:
        flags = i64(pkt[l4 + 13])
        doff = (i64(pkt[l4 + 12]) >> 4) * 4
        seglen = rd16(pkt, l3 + 2) - (l4 - l3) - doff
        seglen += (1 if flags & 2 else 0) + (1 if flags & 1 else 0)
        buf[ip + 9] = L.PROTO_TCP
        wr16(buf, ip + 2, 40)
        wr16(buf, t, rd16(pkt, l4 + 2))
        wr16(buf, t + 2, rd16(pkt, l4))
        if flags & 16:  # RFC 793: <SEQ=SEG.ACK><CTL=RST>
            wr32(buf, t + 4, rd32(pkt, l4 + 8))
            wr32(buf, t + 8, 0)
            buf[t + 13] = 4
        else:  # <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
            wr32(buf, t + 4, 0)
            wr32(buf, t + 8, (rd32(pkt, l4 + 4) + seglen) & 0xFFFFFFFF)
            buf[t + 13] = 4 | 16
        buf[t + 12] = 5 << 4
        wr16(buf, t + 14, 0)
        wr16(buf, t + 16, 0)
        wr16(buf, t + 18, 0)
        acc = pseudo_header_sum(buf, ip, False, L.PROTO_TCP, 20)
        wr16(buf, t + 16, csum_fold(csum_add(buf, t, 20, acc)))
        length = 54
        events[ev] += 1
    else:
        q = rd16(pkt, l3 + 2)
        if q > QUOTE_MAX:
            q = QUOTE_MAX
        room = data.shape[1] - headroom - 42
        if q > room:
            q = room
        buf[ip + 9] = L.PROTO_ICMP
        wr16(buf, ip + 2, 28 + q)
        buf[t] = 3
        buf[t + 1] = 3
        wr16(buf, t + 2, 0)
        wr32(buf, t + 4, 0)
        for b in range(q):
            buf[t + 8 + b] = pkt[l3 + b]
        wr16(buf, t + 2, csum_fold(csum_add(buf, t, 8 + q, 0)))
        length = 42 + q
        events[ev + 1] += 1
    wr16(buf, ip + 10, 0)
    wr16(buf, ip + 10, ipv4_header_checksum(buf, ip))
    if length < 60:
        for b in range(length, 60):
            buf[h + b] = 0
        length = 60
    row_copy(meta, total, meta, i)
    meta[total, L.SLOT] = c
    meta[total, L.START] = h
    meta[total, L.LEN] = length
    meta[total, L.VERDICT] = row[L.IN_PORT]
    meta[total, L.NOTE] = note
    return total + 1


@kernel
def firewall_kernel(data, free, top, meta, n, headroom, now, sweep, rules, cfg, keys, vals,
                    state, bucket, expires, info, key, cands, timeouts, events, flags):
    """Decide rows [0, n); append reject answers. Returns the new row count."""
    total = n
    expired_before = info[I_EXPIRED]
    ct_prefetch_ctrl(state, info, key, data, meta, n, cands)
    for i in range(n):
        tbl_prefetch_found_ahead(state, expires, cands, i, n)  # cands[i]: a candidate
        row = meta[i]
        row[L.NOTE] = 0
        inp = row[L.IN_PORT]
        out = 1 - inp
        etype = row[L.ETYPE]
        if row[L.PERR] != L.E_OK:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        if row[L.TAGS] > 0 or (etype != L.ETH_IPV4 and etype != L.ETH_ARP):
            row[L.VERDICT] = drop_code(D_UNSUPPORTED)
            continue
        if etype == L.ETH_ARP:
            row[L.VERDICT] = out
            row[L.NOTE] = N_ARP
            continue
        pf = row[L.PFLAGS]
        if pf & L.F_IP_CSUM_BAD:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        if pf & L.F_LATER_FRAG:
            row[L.NOTE] = N_FRAG
            row[L.VERDICT] = out if cfg[G_FRAG_ALLOW] else drop_code(D_FRAGMENT)
            continue
        r, e, d = ct_packet(keys, vals, state, expires, info, key, data, row, timeouts,
                            events, 0, now, cands[i])
        a_is_src = d
        if r == REOPEN:
            a_is_src = 1 if (vals[e, V_FLAGS] & F_ORIG_A) != 0 else 0
            ct_delete(state, info, e)
            r = NEW
        if r == ESTABLISHED or r == RELATED:
            row[L.VERDICT] = out
            row[L.NOTE] = N_EST if r == ESTABLISHED else N_RELATED
            continue
        if r == INVALID:
            row[L.NOTE] = N_INVALID
            row[L.VERDICT] = out if cfg[G_INVALID_ALLOW] else drop_code(D_INVALID)
            continue
        # NEW or UNTRACKED: the rules decide
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + row[L.LEN]]
        l3 = row[L.L3_OFF]
        l4 = row[L.L4_OFF]
        proto = row[L.PROTO]
        sport, dport = l4_ports(pkt, l4, proto)
        itype = i64(pkt[l4]) if proto == L.PROTO_ICMP else -1
        j = match_rule(rules, inp, proto, rd32(pkt, l3 + 12), rd32(pkt, l3 + 16), sport,
                       dport, itype)
        if j >= 0:
            action = rules[j, R_ACTION]
            events[C_RULES + rules[j, R_RULE]] += 1
        else:
            action = cfg[G_DEFAULT]
            events[C_DEFAULT] += 1
        if action == ALLOW:
            if r == NEW:
                aux = rules[j, R_RULE] + 1 if j >= 0 else 0
                if ct_create(keys, vals, state, bucket, expires, info, key, a_is_src, data,
                             row, aux, timeouts, events, 0, now, cands[i]) < 0:
                    row[L.VERDICT] = drop_code(D_TABLE_FULL)
                    continue
                row[L.NOTE] = N_RULE if j >= 0 else N_DEFAULT
            else:
                row[L.NOTE] = N_UNTRACKED
            row[L.VERDICT] = out
        elif action == DENY:
            row[L.VERDICT] = drop_code(D_DENIED)
            row[L.NOTE] = N_DENIED
        else:
            total = send_reject(data, free, top, meta, i, total, headroom, events, C_RST,
                                N_REPLY)
            row[L.VERDICT] = drop_code(D_REJECTED)
            row[L.NOTE] = N_REJECTED
    flags[0] = ct_sweep(state, expires, info, events, 0, now, sweep, expired_before)
    return total


# -- device ----------------------------------------------------------------------------

class Firewall(Device):
    type_name = "firewall"
    config_model = FirewallConfig
    drop_reasons = DROPS
    counters = CT_EVENTS + OWN_EVENTS
    notes = NOTES
    max_emit = 1  # a reject answer per input row
    ticks = True  # expiry goes on while no packet comes

    def __init__(self, name: str, config: FirewallConfig) -> None:
        super().__init__(name, config)
        self.counters = CT_EVENTS + OWN_EVENTS + tuple(
            f"rule{i + 1}_hits" for i in range(len(config.rules)))
        self.rules = compile_rules(config.rules, config.ports)
        self.cfg = np.array([ACTIONS[config.default], config.fragments == "allow",
                             config.invalid == "allow"], np.int64)
        self.timeouts = timeouts_array(config.timeouts)
        self.flush_on_reload = config.flush

    def new_state(self) -> FirewallState:
        return FirewallState(self.config)

    def describe(self) -> str:
        return (f"{self.name} ({self.type_name}: {len(self.config.rules)} rules, default "
                f"{self.config.default})")

    def _bind(self, state: FirewallState, rows: int) -> tuple[tuple, int]:
        """firewall_kernel's arguments that stay the same
        (:meth:`DeviceState.bound`)."""
        t = state.ct.table
        cands = state.scratch(rows, "cands")
        return (self.rules, self.cfg, t.keys, t.vals, t.state, t.bucket, t.expires, t.info,
                state.ct.key, cands, self.timeouts, state.events, state.flags), len(cands)

    def process(self, batch, state: FirewallState, now: float) -> None:
        call, args = state.bound(self, firewall_kernel, self._bind, batch.n)
        pool = batch.pool
        batch.n = call.target(pool.data, pool.free, pool.top, batch.meta, batch.n,
                              pool.headroom, float(now), SWEEP_BATCH if batch.n else SWEEP_TICK,
                              *args)
        if state.flags[0]:
            state.ct.after_batch(1, state.events, now)
