"""``policer``: token-bucket rate limits between two ports (a bump in the wire).

Ports: the two names in ``ports`` (e.g. ``[inside, outside]``); what passes leaves by
the other port. Each direction is policed on its own (by the port it came in on).

Config::

    type: policer
    ports: [inside, outside]
    rate: 10mbit                 # 10mbit, 500kbit, 1.25MB/s, 20000pps, 1.5kpps
    burst: 64kB                  # bucket depth; default: 100 ms of the rate
    per: port                    # port: one bucket per direction | flow: one per flow
    exceed: drop                 # drop | {mark: DSCP}: 0..63 or ef, af11..af43, cs0..cs7, le
    directions: [inside]         # ingress ports that are policed (default: both)
    max_flows: 65536             # per: flow only: flow buckets at most (1 .. 16777216)

**Rate** is a number and a unit, SI prefixes (k = 1000, M, G, T), decimals allowed:
bits per second ``bit`` (``kbit``, ``mbit``, ``gbit``, ``tbit``; ``/s`` optional),
bytes per second ``B/s`` (``kB/s``, ``MB/s``, ...; capital B and ``/s`` required) or
packets per second ``pps`` (``kpps``, ``mpps``). ``Mbps``-style units are refused
(tc reads them as bytes, most people as bits). The unit sets the mode: in **bytes
mode** (bits or bytes per second) a frame costs its length as the device sees it:
the Ethernet header (with any VLAN tags) and payload, without preamble, FCS or
inter-frame gap (a 1500-byte IP packet costs 1514 bytes); in **packets mode** every
frame costs one packet. Bytes mode takes 1 bit/s .. 10 Tbit/s, whole bits per second;
packets mode 0.001 .. 10^9 pps, in steps of 0.001.

**Burst** is the bucket's depth: bytes mode: a size (``1518``, ``64kB``, ``64KiB``,
``1.5MB``, ``512kbit``; plain numbers are bytes, k = 1000, Ki = 1024), 1518 bytes (one
full-size frame with a VLAN tag) .. 1 GB; packets mode: packets (``32``, ``32 packets``),
1 .. 10^6; either mode: a duration (``50ms``, ``0.2s``, ``500us``) of the rate.
Default: 100 ms of the rate, at least the minimum. A frame larger than the burst
never conforms (it is counted as exceeding).

**Metering** (RFC 2697's single-rate marker with only the committed bucket, colour
blind; i.e. two colours): a bucket starts full and gains ``rate`` tokens per second
up to ``burst``. A frame conforms when the bucket holds its cost, which is then
taken; otherwise it exceeds and takes nothing. Tokens are integers (1e-9 of a bit,
or of a milli-packet) and time is counted in whole nanoseconds of ``now``: the
refill ``elapsed_ns * rate`` is exact, so long runs do not drift (over any interval
the conforming cost is at most ``rate * T + burst``, exactly). Time going backwards
adds nothing. Conforming frames pass unchanged. Exceeding frames are dropped
``exceed``, or with ``exceed: {mark: D}`` pass with their DSCP rewritten to ``D``
(ECN bits kept; IPv4: header checksum updated incrementally, RFC 1624, so a bad one
stays bad; IPv6: traffic class); an exceeding frame that has no IP header to mark
(ARP, other ethertypes, a truncated IP header) is dropped ``unmarkable``. Frames
arriving on a port not in ``directions`` pass unmetered. Parse errors are not the
policer's business: such frames are metered like any other (per flow: by their L2
key, below).

**per: port** -- one bucket per policed ingress port. With several workers each
worker holds its own (a per-port limit then applies per worker: a known limit).

**per: flow** -- one bucket per flow and direction, in a bounded table (flow state,
exported and imported by flow bucket with the flow). A flow is keyed by: IPv4/IPv6
packets: protocol and the two (address, port) endpoints in canonical order (both
directions find one entry; TCP/UDP ports, 0 for other protocols and for fragments,
whose later parts carry none), ICMP errors and echo sessions apart through the flow
hash; any other frame (ARP, other ethertypes, parse errors): its ethertype and MAC
pair; both also by VLAN, tenant and the parser's flow hash (so every key lies in
one flow bucket). An entry is forgotten when its buckets would be full again (the
time a silent flow needs to refill), never earlier: forgetting a flow never gives
it tokens it would not have had, and idle flows free their slots by themselves. A
new flow that finds the table full of live entries (after reclaiming expired ones)
is metered by the direction's **overflow bucket** (one per port, same rate and
burst, shared by every flow without an entry), counted ``overflow_packets``: never
unpoliced.

A config reload keeps the flow buckets (clamped to a smaller new burst); per-port
and overflow buckets start full again (at most one extra burst). Changing ``per``
or lowering ``max_flows`` below the live flows starts fresh state.

Drop reasons: ``exceed``, ``unmarkable``. Counters (``EVENTS``): ``conform_packets``,
``conform_bytes``, ``exceed_packets``, ``exceed_bytes`` (frame bytes, also in
packets mode; exceeding = dropped or marked), ``marked``, ``flows_created``,
``flows_expired``, ``overflow_packets``.

State (:class:`PolicerState`): per flow: the flow table ``meters`` (flow state: key
``KEY_WORDS`` words, values tokens and last update per direction); per port and
overflow: ``meters`` array (per worker).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dva._jit import i64, kernel
from dva.nf.base import Device, DeviceConfig, DeviceState, Name, drop_code, two_ports
from dva.nf.conntrack import pack32
from dva.nf.table import (
    I_EXPIRED,
    I_LIVE,
    I_MAX,
    HashTable,
    tbl_insert,
    tbl_lookup,
    tbl_sweep,
)
from dva.packet import layout as L
from dva.packet.checksum import csum_update16, rd16, rd32, rd48, wr16

DROPS = (
    "exceed",  # over the rate (exceed: drop)
    "unmarkable",  # over the rate (exceed: mark), but no IP header to mark
)
D_EXCEED, D_UNMARKABLE = range(len(DROPS))

EVENTS = ("conform_packets", "conform_bytes", "exceed_packets", "exceed_bytes", "marked",
          "flows_created", "flows_expired", "overflow_packets")
(C_CONFORM_P, C_CONFORM_B, C_EXCEED_P, C_EXCEED_B, C_MARKED, C_CREATED, C_EXPIRED,
 C_OVERFLOW) = range(len(EVENTS))

NOTES = ("", "conform", "exceed: dropped", "exceed: DSCP marked",
         "exceed: nothing to mark, dropped", "direction not policed")
N_CONFORM, N_EXCEED, N_MARKED, N_UNMARKABLE, N_UNPOLICED = range(1, len(NOTES))

SCALE = 10**9  # tokens per base unit (a bit, or a milli-packet): credit is rate per ns
MILLI = 1000  # base units per packet in packets mode
MIN_RATE_BITS, MAX_RATE_BITS = 1, 10**13
MIN_RATE_MPPS, MAX_RATE_MPPS = 1, 10**12  # milli-packets per second
MIN_BURST_BYTES, MAX_BURST_BYTES = 1518, 10**9
MIN_BURST_PACKETS, MAX_BURST_PACKETS = 1, 10**6
DEFAULT_BURST_TIME = Decimal("0.1")
MAX_FLOWS_LIMIT = 1 << 24
KEY_WORDS = 6
VALUE_WORDS = 4  # tokens, last update (ns) for direction 0, then for direction 1
K_IP, K_L2 = 1, 2  # key kinds (top bits of key word 0)
EXPIRY_SLACK_NS = 1000  # an entry outlives its refill time by this much (float rounding)
SWEEP_BATCH = 64  # table slots checked per batch
SWEEP_TICK = 4096  # per tick (an empty batch)
SWEEP_FULL = 64  # when a new flow finds the table full
# meters[] rows: per-port buckets by ingress port, then the overflow buckets
M_PORT, M_OVERFLOW = 0, 2
# cfg[] columns
G_RATE, G_DEPTH, G_PER_BYTE, G_PER_PKT, G_MARK, G_DIRS, G_PER_FLOW = range(7)

DSCP_NAMES = {"be": 0, "default": 0, "le": 1, "ef": 46, "va": 44,
              **{f"cs{i}": 8 * i for i in range(8)},
              **{f"af{c}{d}": 8 * c + 2 * d for c in range(1, 5) for d in range(1, 4)}}


# -- config ------------------------------------------------------------------------

_NUM_UNIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z/]*)\s*$")
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BIT_RATE = re.compile(r"^([kKmMgGtT]?)bits?(/s)?$")
_BYTE_RATE = re.compile(r"^([kKmMgGtT]?)B/s$")
_PKT_RATE = re.compile(r"^([kKmM]?)pps$")
_SIZE = re.compile(r"^(?:([kmgKMG]i?)?[bB]|([kKmMgG]?)bits?)$")
_PACKETS = re.compile(r"^(?:packets?|pkts?)$")
_TIME = {"s": Decimal(1), "ms": Decimal("0.001"), "us": Decimal("0.000001")}
RATE_HELP = ("a number and a unit: bits per second (10mbit, 500kbit), bytes per second "
             "(1.25MB/s) or packets per second (20000pps, 1.5kpps)")


def _num_unit(v: str, what: str, help_: str) -> tuple[Decimal, str]:
    m = _NUM_UNIT.match(v)
    if not m:
        raise ValueError(f"bad {what} {v!r}: {help_}")
    try:
        return Decimal(m.group(1)), m.group(2)
    except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"bad {what} {v!r}: {help_}") from None


def parse_rate(v: str) -> tuple[str, int]:
    """(mode, rate in base units per second): ("bytes", bits/s) or ("packets", mpps)."""
    if isinstance(v, bool) or not isinstance(v, str):
        raise ValueError(f"bad rate {v!r}: a rate needs a unit: {RATE_HELP}")
    x, unit = _num_unit(v, "rate", RATE_HELP)
    if m := _BIT_RATE.match(unit):
        mode, units, lo, hi = "bytes", x * _SI[m.group(1).lower()], MIN_RATE_BITS, \
            MAX_RATE_BITS
        what = "bits per second"
    elif m := _BYTE_RATE.match(unit):
        mode, units, lo, hi = "bytes", x * _SI[m.group(1).lower()] * 8, MIN_RATE_BITS, \
            MAX_RATE_BITS
        what = "bits per second"
    elif m := _PKT_RATE.match(unit):
        mode, units, lo, hi = "packets", x * _SI[m.group(1).lower()] * MILLI, \
            MIN_RATE_MPPS, MAX_RATE_MPPS
        what = "thousandths of a packet per second"
    else:
        extra = " (Mbps-style units are ambiguous: write mbit or MB/s)" \
            if re.match(r"^[kKmMgGtT]?[bB]ps$", unit) else ""
        raise ValueError(f"bad rate {v!r}: {RATE_HELP}{extra}")
    if units != units.to_integral_value():
        raise ValueError(f"bad rate {v!r}: not a whole number of {what}")
    if not lo <= units <= hi:
        raise ValueError(f"rate {v!r} out of range: 1 bit/s .. 10 Tbit/s, or "
                         f"0.001 .. 1000000000 pps")
    return mode, int(units)


def parse_burst(v: int | str | None, mode: str, rate: int) -> int:
    """The bucket depth in base units (bits, or milli-packets) for a rate's mode."""
    lo, hi = (MIN_BURST_BYTES * 8, MAX_BURST_BYTES * 8) if mode == "bytes" else \
        (MIN_BURST_PACKETS * MILLI, MAX_BURST_PACKETS * MILLI)
    if v is None:
        return max(lo, min(hi, math.ceil(rate * DEFAULT_BURST_TIME)))
    sizes = "a size (1518, 64kB, 64KiB, 512kbit) or a duration (50ms)" \
        if mode == "bytes" else "packets (32, 32 packets) or a duration (50ms)"
    if isinstance(v, bool):
        raise ValueError(f"bad burst {v!r}: {sizes}")
    if isinstance(v, int):
        x, unit = Decimal(v), ""
    else:
        x, unit = _num_unit(str(v), "burst", sizes)
    if unit in _TIME:
        depth = math.ceil(rate * x * _TIME[unit])
    elif unit == "":
        depth = math.ceil(x * (8 if mode == "bytes" else MILLI))
    elif mode == "bytes" and (m := _SIZE.match(unit)):
        if m.group(2) is not None:  # bits
            depth = math.ceil(x * _SI[m.group(2).lower()])
        else:
            p = (m.group(1) or "").lower()
            mult = 1024 ** (" kmg".index(p[0])) if p.endswith("i") else _SI[p]
            depth = math.ceil(x * mult * 8)
    elif mode == "packets" and _PACKETS.match(unit):
        depth = math.ceil(x * MILLI)
    elif mode == "packets" and _SIZE.match(unit):
        raise ValueError(f"bad burst {v!r}: the rate is in packets per second, so the "
                         f"burst is {sizes}")
    elif mode == "bytes" and _PACKETS.match(unit):
        raise ValueError(f"bad burst {v!r}: the rate is in bits or bytes per second, so "
                         f"the burst is {sizes}")
    else:
        raise ValueError(f"bad burst {v!r}: {sizes}")
    if not lo <= depth <= hi:
        rng = f"{MIN_BURST_BYTES} bytes (one full-size frame) .. 1 GB" if mode == "bytes" \
            else f"{MIN_BURST_PACKETS} .. {MAX_BURST_PACKETS} packets"
        have = f"{Decimal(depth) / 8} bytes" if mode == "bytes" else \
            f"{Decimal(depth) / MILLI} packets"
        raise ValueError(f"burst {v!r} is {have}; it must be {rng}")
    return depth


class Exceed(BaseModel):
    """``exceed: drop`` or ``exceed: {mark: DSCP}`` (exceeding IP packets pass with
    this DSCP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mark: int = -1  # -1: drop

    @model_validator(mode="before")
    @classmethod
    def _form(cls, v):
        if v == "drop":
            return {}
        if not isinstance(v, dict) or "mark" not in v:
            raise ValueError(f"bad exceed {v!r}: drop, or {{mark: DSCP}}")
        return v

    @field_validator("mark", mode="before")
    @classmethod
    def _dscp(cls, v):
        if isinstance(v, str) and v.strip().lower() in DSCP_NAMES:
            return DSCP_NAMES[v.strip().lower()]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 63:
            raise ValueError(f"bad DSCP {v!r}: 0..63 or a name ({', '.join(DSCP_NAMES)})")
        return v

    @property
    def drops(self) -> bool:
        return self.mark < 0


class PolicerConfig(DeviceConfig):
    type: Literal["policer"]
    ports: list[Name]
    rate: str
    burst: int | str | None = None
    per: Literal["port", "flow"] = "port"
    exceed: Exceed = Field(default_factory=lambda: Exceed.model_validate("drop"))
    directions: list[Name] | None = None
    max_flows: int = Field(default=65536, ge=1, le=MAX_FLOWS_LIMIT)

    @field_validator("ports")
    @classmethod
    def _two_ports(cls, v):
        return two_ports(v, "policer")

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v):
        parse_rate(v)
        return v

    @field_validator("burst")
    @classmethod
    def _burst(cls, v, info: ValidationInfo):
        if "rate" in info.data:
            parse_burst(v, *parse_rate(info.data["rate"]))
        return v

    @field_validator("directions")
    @classmethod
    def _directions(cls, v, info: ValidationInfo):
        if not v:
            raise ValueError("no direction policed: leave directions out for both")
        if len(set(v)) != len(v):
            raise ValueError("a port is listed twice")
        ports = info.data.get("ports")
        if ports is not None:
            for p in v:
                if p not in ports:
                    raise ValueError(f"{p!r} is not a port of this policer "
                                     f"({', '.join(ports)})")
        return v

    @model_validator(mode="after")
    def _per(self) -> PolicerConfig:
        if "max_flows" in self.model_fields_set and self.per != "flow":
            raise ValueError("max_flows applies to per: flow only")
        return self

    def port_names(self) -> list[str]:
        return list(self.ports)

    def meter(self) -> tuple[str, int, int]:
        """(mode, rate in base units per second, depth in base units)."""
        mode, rate = parse_rate(self.rate)
        return mode, rate, parse_burst(self.burst, mode, rate)


class PolicerState(DeviceState):
    def __init__(self, config: PolicerConfig) -> None:
        super().__init__(len(EVENTS))
        _, _, depth = config.meter()
        flows = config.per == "flow"
        self.table = HashTable(KEY_WORDS, VALUE_WORDS, config.max_flows if flows else 1)
        if flows:
            self.flow_tables["meters"] = self.table
        # per-port buckets (rows 0, 1) and overflow buckets (rows 2, 3): tokens, last
        self.meters = np.zeros((4, 2), np.int64)
        self.meters[:, 0] = depth * SCALE
        self.key = np.zeros(KEY_WORDS, np.int64)  # kernel scratch


# -- kernels ---------------------------------------------------------------------------

@kernel
def take(m, r, c, cost, rate, depth, now_ns):
    """The token bucket at ``m[r, c]`` (tokens) and ``m[r, c + 1]`` (last refill, ns):
    refill it for the time passed, then take ``cost`` if it holds that much.
    Returns True (conform) or False (exceed). Integers only: ``elapsed * rate`` is
    computed only below the depth, so it cannot overflow."""
    tok = i64(m[r, c])
    last = i64(m[r, c + 1])
    if now_ns > last:
        need = depth - tok
        if need <= 0 or now_ns - last >= (need + rate - 1) // rate:
            tok = depth
        else:
            tok += (now_ns - last) * rate
        m[r, c + 1] = now_ns
    if tok > depth:
        tok = depth  # a reload lowered the depth
    if tok >= cost:
        m[r, c] = tok - cost
        return True
    m[r, c] = tok
    return False


@kernel
def _full_at(vals, e, rate, depth):
    """When both buckets of flow entry ``e`` are full again (seconds): the entry is
    then no different from a new one and may be forgotten."""
    t = 0
    for d in range(2):
        last = i64(vals[e, 2 * d + 1])
        need = depth - i64(vals[e, 2 * d])
        full = last + (need + rate - 1) // rate if need > 0 else last
        if full > t:
            t = full
    return (t + EXPIRY_SLACK_NS) / 1e9


@kernel
def flow_key(key, pkt, row):
    """Write the key of the flow of ``row`` (module docstring) into ``key``."""
    pf = row[L.PFLAGS]
    sp = 0
    dp = 0
    if (pf & L.F_L3_OK) != 0 and (pf & (L.F_IPV4 | L.F_IPV6)) != 0:
        l3 = row[L.L3_OFF]
        kind = K_IP
        what = row[L.PROTO] & 0xFFFF
        if pf & L.F_IPV4:
            a0 = 0
            a1 = rd32(pkt, l3 + 12)
            b0 = 0
            b1 = rd32(pkt, l3 + 16)
        else:
            a0 = pack32(rd32(pkt, l3 + 8), rd32(pkt, l3 + 12))
            a1 = pack32(rd32(pkt, l3 + 16), rd32(pkt, l3 + 20))
            b0 = pack32(rd32(pkt, l3 + 24), rd32(pkt, l3 + 28))
            b1 = pack32(rd32(pkt, l3 + 32), rd32(pkt, l3 + 36))
        proto = row[L.PROTO]
        if (pf & L.F_L4_OK) != 0 and (pf & L.F_FRAG) == 0 \
                and (proto == L.PROTO_TCP or proto == L.PROTO_UDP):
            l4 = row[L.L4_OFF]
            sp = rd16(pkt, l4)
            dp = rd16(pkt, l4 + 2)
    else:
        kind = K_L2
        what = row[L.ETYPE] & 0xFFFF
        a0 = 0
        b0 = 0
        a1 = 0
        b1 = 0
        if row[L.LEN] >= 12:
            a1 = rd48(pkt, 6)
            b1 = rd48(pkt, 0)
    if a0 > b0 or (a0 == b0 and (a1 > b1 or (a1 == b1 and sp > dp))):
        a0, b0 = b0, a0
        a1, b1 = b1, a1
        sp, dp = dp, sp
    key[0] = (kind << 61) | ((row[L.VLAN] + 1) << 48) | ((row[L.TENANT] & 0xFFFFFFFF) << 16) \
        | what
    key[1] = a0
    key[2] = a1
    key[3] = b0
    key[4] = b1
    key[5] = pack32((sp << 16) | dp, row[L.HASH] & 0xFFFFFFFF)


@kernel
def mark_dscp(pkt, row, dscp):
    """Rewrite the DSCP of an IPv4/IPv6 packet (ECN kept); False when it has no
    complete IP header."""
    pf = row[L.PFLAGS]
    if (pf & L.F_L3_OK) == 0:
        return False
    l3 = row[L.L3_OFF]
    if pf & L.F_IPV4:
        old = rd16(pkt, l3)  # version/IHL, then DSCP (6 bits) and ECN (2)
        new = (old & 0xFF03) | (dscp << 2)
        if new != old:
            wr16(pkt, l3, new)
            wr16(pkt, l3 + 10, csum_update16(rd16(pkt, l3 + 10), old, new))
        return True
    if pf & L.F_IPV6:
        old = rd16(pkt, l3)  # version (4 bits), traffic class (8), flow label (4 of 20)
        wr16(pkt, l3, (old & 0xF03F) | (dscp << 6))
        return True
    return False


@kernel
def _new_flow(keys, vals, state, bucket, expires, info, key, row, depth, now_ns, now):
    """An entry for a new flow with full buckets, or -1 when the table is full of live
    entries."""
    if info[I_LIVE] >= info[I_MAX]:
        tbl_sweep(state, expires, info, now, SWEEP_FULL)
    e = tbl_insert(keys, state, bucket, expires, info, key, row[L.BUCKET], now, now)
    if e >= 0:
        for d in range(2):
            vals[e, 2 * d] = depth
            vals[e, 2 * d + 1] = now_ns
    return e


@kernel
def policer_kernel(data, meta, n, keys, vals, state, bucket, expires, info, key, meters,
                   cfg, events, now_ns, now, sweep):
    """Meter and decide rows [0, n). Returns the row count (nothing appended)."""
    rate = cfg[G_RATE]
    depth = cfg[G_DEPTH]
    mark = cfg[G_MARK]
    for i in range(n):
        row = meta[i]
        inp = row[L.IN_PORT]
        length = row[L.LEN]
        if ((cfg[G_DIRS] >> inp) & 1) == 0:
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_UNPOLICED
            continue
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + length]
        cost = length * cfg[G_PER_BYTE] + cfg[G_PER_PKT]
        if cfg[G_PER_FLOW]:
            flow_key(key, pkt, row)
            e = tbl_lookup(keys, state, expires, info, key, now)
            if e < 0:
                e = _new_flow(keys, vals, state, bucket, expires, info, key, row, depth,
                              now_ns, now)
                if e >= 0:
                    events[C_CREATED] += 1
            if e >= 0:
                ok = take(vals, e, 2 * inp, cost, rate, depth, now_ns)
                expires[e] = _full_at(vals, e, rate, depth)
            else:
                events[C_OVERFLOW] += 1
                ok = take(meters, M_OVERFLOW + inp, 0, cost, rate, depth, now_ns)
        else:
            ok = take(meters, M_PORT + inp, 0, cost, rate, depth, now_ns)
        if ok:
            events[C_CONFORM_P] += 1
            events[C_CONFORM_B] += length
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_CONFORM
            continue
        events[C_EXCEED_P] += 1
        events[C_EXCEED_B] += length
        if mark < 0:
            row[L.VERDICT] = drop_code(D_EXCEED)
            row[L.NOTE] = N_EXCEED
        elif mark_dscp(pkt, row, mark):
            events[C_MARKED] += 1
            row[L.VERDICT] = 1 - inp
            row[L.NOTE] = N_MARKED
        else:
            row[L.VERDICT] = drop_code(D_UNMARKABLE)
            row[L.NOTE] = N_UNMARKABLE
    if cfg[G_PER_FLOW]:
        tbl_sweep(state, expires, info, now, sweep)
    return n


# -- device ----------------------------------------------------------------------------

def ns(now: float) -> int:
    """``now`` (seconds) in the policer's whole nanoseconds."""
    return round(now * 1e9)


class Policer(Device):
    type_name = "policer"
    config_model = PolicerConfig
    drop_reasons = DROPS
    counters = EVENTS
    notes = NOTES

    def __init__(self, name: str, config: PolicerConfig) -> None:
        super().__init__(name, config)
        self.mode, self.rate, self.depth = config.meter()
        policed = config.directions or config.ports
        mark = config.exceed.mark
        per_byte = 8 * SCALE if self.mode == "bytes" else 0
        per_pkt = 0 if self.mode == "bytes" else MILLI * SCALE
        self.cfg = np.array([self.rate, self.depth * SCALE, per_byte, per_pkt, mark,
                             sum(1 << config.ports.index(p) for p in policed),
                             config.per == "flow"], np.int64)
        self.ticks = config.per == "flow"  # idle flows expire while no packet comes

    def new_state(self) -> PolicerState:
        return PolicerState(self.config)

    def describe(self) -> str:
        c = self.config
        burst = f"{Decimal(self.depth) / 8} bytes" if self.mode == "bytes" else \
            f"{Decimal(self.depth) / MILLI} packets"
        what = "drop" if c.exceed.drops else f"mark DSCP {c.exceed.mark}"
        return (f"{self.name} ({self.type_name}: {c.rate}, burst {burst}, per {c.per}, "
                f"exceed {what})")

    def process(self, batch, state: PolicerState, now: float) -> None:
        t = state.table
        before = int(t.info[I_EXPIRED])
        batch.n = policer_kernel(
            batch.pool.data, batch.meta, batch.n, t.keys, t.vals, t.state, t.bucket,
            t.expires, t.info, state.key, state.meters, self.cfg, state.events, ns(now),
            float(now), SWEEP_BATCH if batch.n else SWEEP_TICK)
        if self.ticks and t.needs_rebuild():
            t.rebuild(now)
        state.events[C_EXPIRED] += int(t.info[I_EXPIRED]) - before
