"""Connection tracking: the flow state shared by the stateful devices (firewall, nat).

Not a device: a table and the kernels that classify a packet against it. Each stateful
device owns one :class:`Conntrack` (in its state object, as flow state: exported and
imported by flow bucket when buckets move between workers).

**Key** (2 words, IPv4): the two endpoints' addresses, then the zone (the tenant, 23
bits: :data:`ZONE_LIMIT`), the protocol and the two ports, the endpoints in a
canonical order (endpoint A is the smaller ``address << 16 | port``), so both
directions of a connection find the same entry with one lookup. Ports are the TCP/UDP
ports, for ICMP echo the identifier on both sides, 0 for other protocols. The entry
remembers which endpoint opened the connection (``F_ORIG_A``): a packet from that
endpoint is in the original direction, one to it in the reply direction. The parser's
flow hash is symmetric and hashes an ICMP error as the flow it quotes, so every packet
of a connection (and its ICMP errors) is in the same flow bucket as its entry.

**Classification** (:func:`ct_packet`), one of:

* ``NEW`` -- no entry; the caller decides (rules) and then calls :func:`ct_create`.
  A TCP segment can only open a connection when it is a SYN without ACK; anything
  else without an entry is ``INVALID`` (no mid-stream pickup). ICMP echo replies
  without an entry are ``INVALID``; ICMP types that are neither echo nor errors are
  ``UNTRACKED`` (the caller evaluates them statelessly).
* ``ESTABLISHED`` -- an entry exists and the packet is valid for it (TCP: flags legal
  in the state, sequence and acknowledgement numbers inside the windows).
* ``RELATED`` -- an ICMP error (destination unreachable, time exceeded, parameter
  problem, ...) whose quoted header names a tracked connection. Does not change it.
* ``INVALID`` -- an illegal TCP flag combination, a transition the state machine
  forbids, a segment outside the window (RFC 793 acceptability, as Linux's
  ``tcp_in_window``: "Real Stateful TCP Packet Filtering in IP Filter", G. van
  Rooij), an ICMP error quoting no known connection or quoting too little.
* ``REOPEN`` -- a SYN in TIME_WAIT or CLOSE from the original side: the caller
  deletes the old entry (:func:`ct_delete`) and treats the packet as ``NEW``.

**TCP state machine**: ``TCP_NEXT[direction][segment kind][state]``, below, is the
whole machine (the standard table of Linux's nf_conntrack_proto_tcp, written out
here): states NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK,
TIME_WAIT, CLOSE, SYN_SENT2 (simultaneous open); ``IV``: invalid, ``IG``: let it pass
without changing anything (e.g. a retransmitted SYN/ACK). Window scaling (RFC 7323)
is read from the SYN and SYN/ACK options; SACK blocks are not read (the
acknowledgement lower bound is then the cumulative ACK: after heavy loss a segment
may be judged invalid where Linux would not).

**Timeouts** (seconds; Linux's defaults, each configurable): SYN_SENT 120, SYN_RECV
60, ESTABLISHED 432000 (5 days), FIN_WAIT 120, CLOSE_WAIT 60, LAST_ACK 30, TIME_WAIT
120, CLOSE 10; UDP 30 until a reply is seen, 120 after; ICMP 30; other protocols 600.
An entry expires when its time passes (``now`` advancing, never a clock): lookups
ignore it, and an incremental sweep (a fixed number of slots per batch, more per
tick) reclaims it -- never a full-table scan per batch.

**Bounds**: at most ``max_flows`` entries. A new connection arriving at a full table
evicts one entry that is not *assured* (a TCP connection that never reached
ESTABLISHED, a UDP/ICMP/other flow that never saw a reply): the first such entry
among ``EARLY_DROP_SCAN`` slots from the new key's hash position ("early drop",
counted). When there is none, the connection is refused (counted); assured entries
are never evicted.

**Values** of an entry (int64 words): ``V_FLAGS`` (``F_*`` in its low byte, above
them the device's *aux* number, e.g. the firewall rule that allowed the connection,
the lb's backend: :func:`ct_aux`), ``DEVICE_WORDS`` (3) words for the owning device
(``V_USER``...: the NAT's translation); then TCP's alone: ``V_STATE`` (the TCP
state), per direction d (0: original, 1: reply) the window tracking ``V_END``,
``V_MAXEND``, ``V_MAXWIN`` (32-bit values, direction ``d``'s in the word's half
``d``), and the window scale in byte ``d`` of ``V_SCALE``. The flags and the
device words (``FIRST_WORDS``) share the record's first cache line with the expiry,
the key and the bucket: a packet of a UDP or ICMP flow reads nothing else, and the
entry of a new one writes nothing else (its words past them hold whatever the slot
held before and are never read), so the run-ahead fetches that line alone
(:func:`ct_prefetch_ctrl`); a TCP segment reads and writes the second line too.

Counters (``CT_EVENTS``, in the device's counter array from ``ev0`` on): flows
created, early drops, refusals (table full), invalid packets, related packets,
reopened connections, entries expired.
"""

from __future__ import annotations

import numpy as np

from dva._jit import i64, inline_kernel, kernel
from dva.nf.table import (
    HOT_ONLY,
    I_EXPIRED,
    I_LIVE,
    I_MAX,
    HashTable,
    is_used,
    tbl_begin_pass,
    tbl_delete,
    tbl_hash,
    tbl_insert_at,
    tbl_lookup_at,
    tbl_lookup_inline,
    tbl_needs_rebuild,
    tbl_prefetch_ctrl,
    tbl_sweep,
)
from dva.packet import layout as L
from dva.packet.checksum import rd16, rd32
from dva.packet.parse import l4_ports

M32 = 0xFFFFFFFF
KEY_WORDS = 2
ZONE_LIMIT = L.TENANT_LIMIT  # zones (tenant ids) a key holds: 0 .. ZONE_LIMIT - 1
EARLY_DROP_SCAN = 64
SWEEP_BATCH = 64  # slots checked per batch
SWEEP_TICK = 4096  # slots checked per tick (an empty batch)

# classification results
NEW, ESTABLISHED, RELATED, INVALID, UNTRACKED, REOPEN, FOUND = range(7)
RESULT_NAMES = ("new", "established", "related", "invalid", "untracked", "reopen", "found")

# TCP states (the order of the table's columns)
(S_NONE, S_SYN_SENT, S_SYN_RECV, S_ESTABLISHED, S_FIN_WAIT, S_CLOSE_WAIT, S_LAST_ACK,
 S_TIME_WAIT, S_CLOSE, S_SYN_SENT2) = range(10)
IV, IG = 10, 11
TCP_STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
                   "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
# segment kinds (the table's rows)
K_SYN, K_SYNACK, K_FIN, K_ACK, K_RST, K_NONE = range(6)

_NO, _SS, _SR, _ES, _FW, _CW, _LA, _TW, _CL, _S2 = range(10)
#                       NO   SS   SR   ES   FW   CW   LA   TW   CL   S2   <- state now
TCP_NEXT = np.array([
    [  # original direction (from the endpoint that opened the connection)
        [_SS, _SS, IG, IG, IG, IG, IG, _SS, _SS, _S2],  # SYN
        [IV, IV, IG, IG, IG, IG, IG, IG, IG, _SR],  # SYN/ACK
        [IV, IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, IV],  # FIN
        [_ES, IV, _ES, _ES, _CW, _CW, _TW, _TW, _CL, IV],  # ACK
        [IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL],  # RST
        [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],  # none of these
    ],
    [  # reply direction
        [IV, _S2, IV, IV, IV, IV, IV, IV, IV, _S2],  # SYN
        [IV, _SR, IG, IG, IG, IG, IG, IG, IG, _SR],  # SYN/ACK
        [IV, IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, IV],  # FIN
        [IV, IG, _SR, _ES, _CW, _CW, _TW, _TW, _CL, IG],  # ACK
        [IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL],  # RST
        [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],  # none of these
    ],
], np.int64)

# TCP flags
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
# Legal flag combinations once ECE, CWR and PSH are ignored (Linux's tcp_valid_flags).
TCP_VALID = np.zeros(64, np.int64)
for _f in (SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK,
           ACK | URG):
    TCP_VALID[_f] = 1

# timeouts[]: by TCP state (1..9), then these
T_UDP, T_UDP_REPLIED, T_ICMP, T_OTHER = 10, 11, 12, 13
NTIMEOUTS = 14
DEFAULT_TIMEOUTS = {
    "tcp_syn_sent": 120.0, "tcp_syn_recv": 60.0, "tcp_established": 432000.0,
    "tcp_fin_wait": 120.0, "tcp_close_wait": 60.0, "tcp_last_ack": 30.0,
    "tcp_time_wait": 120.0, "tcp_close": 10.0, "udp": 30.0, "udp_replied": 120.0,
    "icmp": 30.0, "other": 600.0,
}
_TIMEOUT_INDEX = {
    "tcp_syn_sent": (S_SYN_SENT, S_SYN_SENT2), "tcp_syn_recv": (S_SYN_RECV,),
    "tcp_established": (S_ESTABLISHED,), "tcp_fin_wait": (S_FIN_WAIT,),
    "tcp_close_wait": (S_CLOSE_WAIT,), "tcp_last_ack": (S_LAST_ACK,),
    "tcp_time_wait": (S_TIME_WAIT,), "tcp_close": (S_CLOSE,), "udp": (T_UDP,),
    "udp_replied": (T_UDP_REPLIED,), "icmp": (T_ICMP,), "other": (T_OTHER,),
}

# value words
# What a packet of a UDP or ICMP flow reads, and the entry of a new one writes, comes
# first: with the table's expiry, 2 key words and the bucket, the flags (and aux) and
# the device's words fill the record's first cache line (dva.nf.table.HOT_ONLY);
# TCP's state and windows are in the second.
V_FLAGS = 0  # F_* below AUX_SHIFT, the device's aux number above (ct_aux)
AUX_SHIFT = 8
V_USER = 1  # DEVICE_WORDS words for the device (the NAT's translation)
DEVICE_WORDS = 3
FIRST_WORDS = V_USER + DEVICE_WORDS  # the value words in the first line
V_STATE = 4
# window tracking, one word each for both directions: direction d's 32-bit value in
# bits 32d .. 32d + 31 (:func:`window_word`)
V_END, V_MAXEND, V_MAXWIN = 5, 6, 7
V_SCALE = 8  # both directions' window scales: direction d in bits 8d .. 8d + 7
BASE_WORDS = 9  # with the table's expiry, key and bucket: 13 words, 2 lines
# flags
F_ORIG_A = 1  # endpoint A opened the connection
F_REPLIED = 2  # a packet was seen in the reply direction
F_ASSURED = 4  # ESTABLISHED reached / replied: never evicted early
F_WSCALE = 8  # + direction: the window scale option was seen (F_WSCALE << d)

# counters (offsets from the device's ev0)
CT_EVENTS = ("flows_created", "early_drops", "flows_refused", "invalid", "related",
             "reopened", "flows_expired")
(E_CREATED, E_EARLY_DROP, E_REFUSED, E_INVALID, E_RELATED, E_REOPENED,
 E_EXPIRED) = range(len(CT_EVENTS))

MAXACKWIN = 66000
MAX_FLOWS_LIMIT = 1 << 24


def check_timeouts(v: dict[str, float]) -> dict[str, float]:
    """Validate a device's ``timeouts:`` (names of ``DEFAULT_TIMEOUTS`` -> seconds)."""
    for k, secs in v.items():
        if k not in DEFAULT_TIMEOUTS:
            raise ValueError(f"unknown timeout {k!r}; known: {', '.join(DEFAULT_TIMEOUTS)}")
        if not 0 < secs <= 10 * 365 * 86400:
            raise ValueError(f"timeout {k} must be > 0 seconds (and at most 10 years)")
    return v


def timeouts_array(overrides: dict[str, float] | None = None) -> np.ndarray:
    """The kernels' timeout table from names (``DEFAULT_TIMEOUTS``) -> seconds."""
    t = np.zeros(NTIMEOUTS, np.float64)
    merged = dict(DEFAULT_TIMEOUTS)
    merged.update(overrides or {})
    for name, secs in merged.items():
        for i in _TIMEOUT_INDEX[name]:
            t[i] = float(secs)
    return t


class Conntrack:
    """One device's connection table (flow state: moves with its buckets)."""

    def __init__(self, max_flows: int, user_words: int = 0) -> None:
        if user_words > DEVICE_WORDS:
            raise ValueError(f"a connection holds {DEVICE_WORDS} words of a device's, "
                             f"not {user_words}")
        self.table = HashTable(KEY_WORDS, BASE_WORDS, max_flows)
        self.key = np.zeros(KEY_WORDS, np.int64)  # kernel scratch
        self.key2 = np.zeros(KEY_WORDS, np.int64)

    @property
    def arrays(self) -> tuple:
        t = self.table
        return (t.keys, t.vals, t.state, t.bucket, t.expires, t.info)

    def __len__(self) -> int:
        return len(self.table)

    def live(self, now: float) -> int:
        return len(self.table.live(now))

    def after_batch(self, rebuild: int, events: np.ndarray, now: float) -> None:
        """When the batch kernel's sweep asked for it (``rebuild``: tombstones fill a
        quarter of the table), rebuild the table; the expired entries it drops count
        as ``flows_expired`` (the device's ``CT_EVENTS`` start at ``events[0]``)."""
        if rebuild:
            events[E_EXPIRED] += self.table.rebuild(now)

    def connections(self, now: float) -> list[dict]:
        """Every live entry, decoded (for tests, traces and status views)."""
        out = []
        for key, val, bucket, exp in self.table.entries(now):
            k0, k1 = key
            a, b = (k0 >> 32) & M32, k0 & M32
            pa, pb = (k1 >> 16) & 0xFFFF, k1 & 0xFFFF
            if not val[V_FLAGS] & F_ORIG_A:
                a, b, pa, pb = b, a, pb, pa
            proto = (k1 >> 32) & 0xFF
            out.append({
                "zone": k1 >> 40, "proto": proto, "src": a, "sport": pa, "dst": b,
                "dport": pb, "bucket": bucket, "expires": exp,
                "state": TCP_STATE_NAMES[val[V_STATE]] if proto == L.PROTO_TCP else
                ("REPLIED" if val[V_FLAGS] & F_REPLIED else "UNREPLIED"),
                "assured": bool(val[V_FLAGS] & F_ASSURED),
                "aux": val[V_FLAGS] >> AUX_SHIFT,
                "user": val[V_USER:V_USER + DEVICE_WORDS]})
        return out


# -- kernels ---------------------------------------------------------------------------

@inline_kernel
def ct_make_key(key, zone, proto, src, sport, dst, dport):
    """Write the canonical key of a flow into ``key`` (``zone`` below
    :data:`ZONE_LIMIT`); returns True when ``src`` is endpoint A."""
    ea = (src << 16) | sport
    eb = (dst << 16) | dport
    zp = (zone << 40) | (proto << 32)
    if ea <= eb:
        key[0] = pack32(src, dst)
        key[1] = zp | (sport << 16) | dport
        return True
    key[0] = pack32(dst, src)
    key[1] = zp | (dport << 16) | sport
    return False


@inline_kernel
def ct_flags_word(flags, aux):
    """The ``V_FLAGS`` word of flags ``flags`` and aux number ``aux``."""
    return (aux << AUX_SHIFT) | flags


@inline_kernel
def ct_aux(vals, e):
    """Entry ``e``'s aux number: the device's (a firewall rule, an lb backend)."""
    return vals[e, V_FLAGS] >> AUX_SHIFT


@inline_kernel
def ct_set_aux(vals, e, aux):
    vals[e, V_FLAGS] = ct_flags_word(vals[e, V_FLAGS] & ((1 << AUX_SHIFT) - 1), aux)


@inline_kernel
def ct_copy_values(vals, src, dst, proto):
    """Entry ``src``'s values to entry ``dst``: the first line's words, and for TCP
    the rest (a UDP/ICMP/other entry's are never read)."""
    for w in range(FIRST_WORDS):  # a constant bound: unrolled
        vals[dst, w] = vals[src, w]
    if proto == L.PROTO_TCP:
        for w in range(FIRST_WORDS, BASE_WORDS):
            vals[dst, w] = vals[src, w]


@inline_kernel
def pack32(hi, lo):
    """Two 32-bit values in one int64 word. ``hi`` is taken as signed, so that the
    reference (Python ints) stays inside int64 as the compiled code does."""
    if hi >= 0x80000000:
        hi -= 0x100000000
    return (hi << 32) | lo


@inline_kernel
def _before(a, b):
    """Sequence number a comes before b (RFC 1982 serial arithmetic on 32 bits)."""
    return ((a - b) & M32) >= 0x80000000


@inline_kernel
def _tcp_kind(flags):
    if flags & RST:
        return K_RST
    if flags & SYN:
        return K_SYNACK if flags & ACK else K_SYN
    if flags & FIN:
        return K_FIN
    if flags & ACK:
        return K_ACK
    return K_NONE


@kernel
def _wscale(pkt, l4, doff):
    """The window scale option of a SYN (0..14), or -1 when absent."""
    p = l4 + 20
    end = l4 + doff
    while p < end:
        kind = i64(pkt[p])
        if kind == 0:
            return -1
        if kind == 1:
            p += 1
            continue
        if p + 1 >= end:
            return -1
        size = i64(pkt[p + 1])
        if size < 2 or p + size > end:
            return -1
        if kind == 3 and size == 3:
            s = i64(pkt[p + 2])
            return 14 if s > 14 else s
        p += size
    return -1


@inline_kernel
def window_word(w, d):
    """Direction ``d``'s 32-bit half of a window tracking word."""
    return (w >> (32 * d)) & M32


@inline_kernel
def _wget(vals, e, f, d):
    return window_word(vals[e, f], d)


@inline_kernel
def _wset(vals, e, f, d, v):
    w = vals[e, f]
    hi = (w >> 32) & M32
    lo = w & M32
    v &= M32
    # branch-free (d is 0 or 1): see inline_kernel's caution on branching on arguments
    vals[e, f] = pack32(hi + (v - hi) * d, lo + (v - lo) * (1 - d))


@inline_kernel
def _scale(vals, e, d):
    """The window scale of direction ``d`` (both share the word ``V_SCALE``)."""
    return (vals[e, V_SCALE] >> (8 * d)) & 0xFF


@inline_kernel
def _set_scale(vals, e, d, wscale):
    sh = 8 * d
    vals[e, V_SCALE] = (vals[e, V_SCALE] & ~(0xFF << sh)) | (wscale << sh)


@kernel
def _syn_window(vals, e, d, end, win, wscale):
    """Window tracking of direction ``d`` starts (again) at its SYN or SYN/ACK."""
    _wset(vals, e, V_END, d, end)
    _wset(vals, e, V_MAXEND, d, end)
    _wset(vals, e, V_MAXWIN, d, win if win > 0 else 1)
    if wscale >= 0:
        vals[e, V_FLAGS] |= F_WSCALE << d
        _set_scale(vals, e, d, wscale)
    else:
        vals[e, V_FLAGS] &= ~(F_WSCALE << d)
        _set_scale(vals, e, d, 0)
    both = F_WSCALE | (F_WSCALE << 1)
    if d == 1 and (vals[e, V_FLAGS] & both) != both:
        # Scaling applies only when both sides offered it (RFC 7323 2.2), which is
        # known at the SYN/ACK; at the SYN the other side has not spoken yet (zeroing
        # then lost the client's scale: its windows counted 1024x too small).
        vals[e, V_SCALE] = 0


@kernel
def _tcp_window(vals, e, d, state, flags, seq, ack, end, win, wscale):
    """RFC 793 acceptability of a segment in direction ``d`` (the sender), with the
    bookkeeping of Linux's tcp_in_window (no SACK). Returns True if in window."""
    r = 1 - d
    if _wget(vals, e, V_MAXWIN, d) == 0:
        if flags & SYN:
            _syn_window(vals, e, d, end, win, wscale)
            if not flags & ACK:
                return True
        else:
            _wset(vals, e, V_END, d, end)
            sw = (win << _scale(vals, e, d)) & M32
            _wset(vals, e, V_MAXWIN, d, sw if sw > 0 else 1)
            _wset(vals, e, V_MAXEND, d, (end + _wget(vals, e, V_MAXWIN, d)) & M32)
            if _wget(vals, e, V_MAXWIN, r) == 0:
                _wset(vals, e, V_END, r, ack)
                _wset(vals, e, V_MAXEND, r, ack)
    elif ((state == S_SYN_SENT and d == 0) or (state == S_SYN_RECV and d == 1)) \
            and _before(_wget(vals, e, V_END, d), end):
        _syn_window(vals, e, d, end, win, wscale)  # a new SYN (or SYN/ACK) sequence
    if not flags & ACK:
        ack = _wget(vals, e, V_END, r)
    elif (flags & (ACK | RST)) == (ACK | RST) and ack == 0:
        ack = _wget(vals, e, V_END, r)
    if seq == end and (not flags & RST or (seq == 0 and state == S_SYN_SENT)):
        seq = _wget(vals, e, V_END, d)
        end = seq
    s_end = _wget(vals, e, V_END, d)
    s_maxend = _wget(vals, e, V_MAXEND, d)
    s_maxwin = _wget(vals, e, V_MAXWIN, d)
    r_end = _wget(vals, e, V_END, r)
    r_maxwin = _wget(vals, e, V_MAXWIN, r)
    ackwin = s_maxwin if s_maxwin > MAXACKWIN else MAXACKWIN
    if not (_before(seq, (s_maxend + 1) & M32)
            and _before((s_end - r_maxwin - 1) & M32, end)
            and _before(ack, (r_end + 1) & M32)
            and _before((r_end - ackwin - 1) & M32, ack)):
        return False
    if not flags & SYN:
        win = (win << _scale(vals, e, d)) & M32
    if s_maxwin < win:
        _wset(vals, e, V_MAXWIN, d, win)
    if _before(s_end, end):
        _wset(vals, e, V_END, d, end)
    if r_maxwin != 0 and _before(s_maxend, end):
        _wset(vals, e, V_MAXWIN, r, (r_maxwin + ((end - s_maxend) & M32)) & M32)
    top = (ack + win) & M32
    if _before((_wget(vals, e, V_MAXEND, r) - 1) & M32, top):
        _wset(vals, e, V_MAXEND, r, (top + 1) & M32 if win == 0 else top)
    return True


@kernel
def ct_tcp(vals, expires, e, d, pkt, l3, l4, timeouts, now):
    """Advance TCP connection ``e`` with a segment in direction ``d``; returns
    ESTABLISHED (passes), INVALID, or REOPEN (a new SYN on a closed connection)."""
    flags = i64(pkt[l4 + 13])
    kind = _tcp_kind(flags)
    state = vals[e, V_STATE]
    nxt = TCP_NEXT[d, kind, state]
    if nxt == IV:
        return INVALID
    if nxt == IG:
        return ESTABLISHED
    if nxt == S_SYN_SENT and state >= S_TIME_WAIT:
        return REOPEN
    doff = (i64(pkt[l4 + 12]) >> 4) * 4
    seq = rd32(pkt, l4 + 4)
    ack = rd32(pkt, l4 + 8)
    win = rd16(pkt, l4 + 14)
    seglen = rd16(pkt, l3 + 2) - (l4 - l3) - doff
    end = (seq + seglen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)) & M32
    wscale = -1
    if flags & SYN:
        wscale = _wscale(pkt, l4, doff)
    if not _tcp_window(vals, e, d, state, flags, seq, ack, end, win, wscale):
        return INVALID
    vals[e, V_STATE] = nxt
    if d == 1:
        vals[e, V_FLAGS] |= F_REPLIED
    if nxt == S_ESTABLISHED:
        vals[e, V_FLAGS] |= F_ASSURED
    expires[e] = now + timeouts[nxt]
    return ESTABLISHED


@inline_kernel
def ct_other(vals, expires, e, d, proto, timeouts, now):
    """Advance a UDP / ICMP echo / other-protocol flow with a packet in direction d."""
    if d == 1:
        vals[e, V_FLAGS] |= F_REPLIED | F_ASSURED
    replied = (vals[e, V_FLAGS] & F_REPLIED) != 0
    if proto == L.PROTO_UDP:
        expires[e] = now + (timeouts[T_UDP_REPLIED] if replied else timeouts[T_UDP])
    elif proto == L.PROTO_ICMP:
        expires[e] = now + timeouts[T_ICMP]
    else:
        expires[e] = now + timeouts[T_OTHER]
    return ESTABLISHED


@inline_kernel
def _icmp_kind(itype):
    """0: error (quotes a packet), 1: echo request, 2: echo reply, 3: other."""
    if itype == 3 or itype == 4 or itype == 5 or itype == 11 or itype == 12:
        return 0
    if itype == 8:
        return 1
    if itype == 0:
        return 2
    return 3


@inline_kernel
def ct_quoted(pkt, n, l4):
    """The tuple of the packet an ICMP error at ``l4`` quotes (bytes up to ``n``):
    ``(ok, proto, src, sport, dst, dport)``; ``ok`` False when the quote is too
    short or not a trackable packet (an echo request's identifier in both ports)."""
    q = l4 + 8
    if q + 20 > n or (i64(pkt[q]) >> 4) != 4:
        return False, 0, 0, 0, 0, 0
    ihl = (i64(pkt[q]) & 0xF) * 4
    if ihl < 20:
        return False, 0, 0, 0, 0, 0
    proto = i64(pkt[q + 9])
    src = rd32(pkt, q + 12)
    dst = rd32(pkt, q + 16)
    il4 = q + ihl
    sport = 0
    dport = 0
    if proto == L.PROTO_TCP or proto == L.PROTO_UDP:
        if il4 + 4 > n:
            return False, 0, 0, 0, 0, 0
        sport = rd16(pkt, il4)
        dport = rd16(pkt, il4 + 2)
    elif proto == L.PROTO_ICMP:
        if il4 + 8 > n or i64(pkt[il4]) != 8:
            return False, 0, 0, 0, 0, 0  # only echo requests are tracked and quoted
        sport = rd16(pkt, il4 + 4)
        dport = sport
    return True, proto, src, sport, dst, dport


@kernel
def ct_related_key(pkt, n, l4, zone, key):
    """The key of the connection an ICMP error at ``l4`` quotes, into ``key``.
    Returns False when the quote is too short or not a trackable packet."""
    ok, proto, src, sport, dst, dport = ct_quoted(pkt, n, l4)
    if ok:
        ct_make_key(key, zone, proto, src, sport, dst, dport)
    return ok


@inline_kernel
def ct_classify(keys, state, vals, expires, info, key, data, row, events, ev0, now):
    """:func:`ct_classify_at` without a slot found earlier."""
    return ct_classify_at(keys, state, vals, expires, info, key, data, row, events, ev0,
                          now, -1)


@inline_kernel
def ct_classify_at(keys, state, vals, expires, info, key, data, row, events, ev0, now,
                   hint):
    """Look the IPv4 packet of metadata ``row`` up (parsed: L4 header valid, or a
    protocol without one), without changing any entry. Returns ``(result, entry
    slot, direction)``: ``FOUND`` with the entry and the packet's direction (0:
    original, 1: reply; advance it with :func:`ct_advance`), ``RELATED`` with the
    entry of the connection the ICMP error quotes (its key in ``key``), ``NEW`` (the
    canonical key in ``key``; the direction is 1 when the packet's source is endpoint
    A, for :func:`ct_create`), ``INVALID`` or ``UNTRACKED``. ``hint``: the row's
    candidate slot, or the slot a run-ahead loop's lookup of its key found
    (:func:`dva.nf.table.tbl_hint`), or -1; the lookup starts from it
    (:func:`dva.nf.table.tbl_lookup_at`)."""
    s = row[L.START]
    n = row[L.LEN]
    pkt = data[row[L.SLOT], s:s + n]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    proto = row[L.PROTO]
    zone = row[L.TENANT]
    src = rd32(pkt, l3 + 12)
    dst = rd32(pkt, l3 + 16)
    sport, dport = l4_ports(pkt, l4, proto)
    if proto == L.PROTO_TCP:
        if TCP_VALID[i64(pkt[l4 + 13]) & 0x37] == 0:
            events[ev0 + E_INVALID] += 1
            return INVALID, -1, 0
    elif proto == L.PROTO_ICMP:
        k = _icmp_kind(i64(pkt[l4]))
        if k == 0:
            if ct_related_key(pkt, l3 + rd16(pkt, l3 + 2), l4, zone, key):
                e = tbl_lookup_inline(keys, state, expires, info, key, now)
                if e >= 0:
                    events[ev0 + E_RELATED] += 1
                    return RELATED, e, 0
            events[ev0 + E_INVALID] += 1
            return INVALID, -1, 0
        if k == 3:
            return UNTRACKED, -1, 0
        sport = rd16(pkt, l4 + 4)
        dport = sport
    a = ct_make_key(key, zone, proto, src, sport, dst, dport)
    e = tbl_lookup_at(keys, state, expires, info, key, now, hint)
    if e < 0:
        if (proto == L.PROTO_TCP and (i64(pkt[l4 + 13]) & (SYN | ACK | RST | FIN)) != SYN) \
                or (proto == L.PROTO_ICMP and i64(pkt[l4]) == 0):
            events[ev0 + E_INVALID] += 1
            return INVALID, -1, 0
        return NEW, -1, 1 if a else 0
    return FOUND, e, 0 if a == ((vals[e, V_FLAGS] & F_ORIG_A) != 0) else 1


@inline_kernel
def ct_advance(vals, expires, e, d, data, row, timeouts, events, ev0, now):
    """Advance connection ``e`` with the packet of ``row`` in direction ``d``:
    ESTABLISHED (it passes), INVALID, or REOPEN (a new SYN on a closed connection)."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    proto = row[L.PROTO]
    l4 = row[L.L4_OFF]
    if proto == L.PROTO_ICMP and (i64(pkt[l4]) == 8) != (d == 0):
        events[ev0 + E_INVALID] += 1  # echo requests go one way, replies the other
        return INVALID
    if proto == L.PROTO_TCP:
        r = ct_tcp(vals, expires, e, d, pkt, row[L.L3_OFF], l4, timeouts, now)
        if r == INVALID:
            events[ev0 + E_INVALID] += 1
        elif r == REOPEN:
            events[ev0 + E_REOPENED] += 1
        return r
    return ct_other(vals, expires, e, d, proto, timeouts, now)


@inline_kernel
def ct_packet(keys, vals, state, expires, info, key, data, row, timeouts, events, ev0,
              now, hint):
    """:func:`ct_classify_at` (``hint``: a slot that may hold the row's entry, or
    -1), then :func:`ct_advance` for a packet of a known connection: ``(ESTABLISHED
    | INVALID | REOPEN | NEW | RELATED | UNTRACKED, entry, direction)``."""
    r, e, d = ct_classify_at(keys, state, vals, expires, info, key, data, row, events,
                             ev0, now, hint)
    if r != FOUND:
        return r, e, d
    return ct_advance(vals, expires, e, d, data, row, timeouts, events, ev0, now), e, d


@inline_kernel
def ct_ported(row):
    """The row is an intact IPv4 TCP or UDP packet: its 5-tuple names a connection
    (what the run-ahead loops prefetch for)."""
    proto = row[L.PROTO]
    return row[L.ETYPE] == L.ETH_IPV4 and row[L.PERR] == L.E_OK and row[L.L4_OFF] >= 0 \
        and (proto == L.PROTO_TCP or proto == L.PROTO_UDP)


@inline_kernel
def ct_row_key(key, data, row):
    """The key of a TCP/UDP row (:func:`ct_ported`), built from its frame: what the
    run-ahead loops look up or prefetch."""
    s0 = row[L.START]
    pkt = data[row[L.SLOT], s0:s0 + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    ct_make_key(key, row[L.TENANT], row[L.PROTO], rd32(pkt, l3 + 12), rd16(pkt, l4),
                rd32(pkt, l3 + 16), rd16(pkt, l4 + 2))


@inline_kernel
def ct_first_line(row):
    """The row's entry is a UDP flow's: its packets read, and its creation writes,
    only the record's first line, which the run-ahead fetches alone
    (:data:`dva.nf.table.HOT_ONLY`)."""
    return row[L.PROTO] == L.PROTO_UDP


@kernel
def ct_prefetch_ctrl(state, info, key, data, meta, n, hs):
    """The first pass of a batch's run-ahead: each TCP/UDP row's key hashed (into
    ``hs[i]``, -1 for a row that is not looked up) and its home slot's control bytes
    prefetched (a few MiB for a large table: they mostly stay cached). The decision
    loop then calls :func:`dva.nf.table.tbl_prefetch_found_ahead` first thing in
    each row's iteration: a few rows ahead, it finds from those bytes the slot each
    key is in (or the free slot where its new entry would go) and prefetches that
    record alone, so that the record's miss overlaps the rows decided meanwhile.
    ``hs[i]`` is then that slot, the row's candidate: a hint for
    :func:`ct_classify_at` and :func:`ct_create`, which then check one slot instead
    of probing. It is the batch's first pass (:func:`dva.nf.table.tbl_begin_pass`).
    Only the first line of a UDP row's record is fetched (:func:`ct_first_line`)."""
    tbl_begin_pass(info)
    for i in range(n):
        row = meta[i]
        hs[i] = -1
        if not ct_ported(row):
            continue
        ct_row_key(key, data, row)
        h = tbl_hash(key)
        tbl_prefetch_ctrl(state, h)
        hs[i] = h | HOT_ONLY if ct_first_line(row) else h


@kernel
def _early_drop(keys, vals, state, expires, info, key, now):
    """Delete one entry near ``key``'s hash position that has expired (returns 2) or
    is not assured (returns 1); 0 when there is none."""
    mask = state.shape[0] - 1
    s = tbl_hash(key) & mask
    for _ in range(EARLY_DROP_SCAN):
        if is_used(state[s]):
            if expires[s] < now:
                tbl_delete(state, info, s)
                info[I_EXPIRED] += 1
                return 2
            if (vals[s, V_FLAGS] & F_ASSURED) == 0:
                tbl_delete(state, info, s)
                return 1
        s = (s + 1) & mask
    return 0


@inline_kernel
def ct_create(keys, vals, state, bucket, expires, info, key, a_is_src, data, row, aux,
              timeouts, events, ev0, now, c):
    """Create the entry of a NEW packet (key from :func:`ct_packet`); its first packet
    is accounted for. ``c``: the key's candidate slot (the hint its lookup had), or
    -1 (:func:`dva.nf.table.tbl_insert_at`). Returns the slot, or -1 when the table
    is full and nothing may be evicted (the connection is refused)."""
    if info[I_LIVE] >= info[I_MAX]:
        dropped = _early_drop(keys, vals, state, expires, info, key, now)
        if dropped == 0:
            events[ev0 + E_REFUSED] += 1
            return -1
        if dropped == 1:
            events[ev0 + E_EARLY_DROP] += 1
    e = tbl_insert_at(keys, state, bucket, expires, info, key, row[L.BUCKET], now, now, c)
    if e < 0:
        events[ev0 + E_REFUSED] += 1
        return -1
    proto = row[L.PROTO]
    # constant bounds unroll the loops (2 ns of a new lb connection's,
    # docs/benchmarks.md); a UDP/ICMP/other entry writes its first line alone
    for w in range(V_USER, FIRST_WORDS):
        vals[e, w] = 0
    if proto == L.PROTO_TCP:
        for w in range(FIRST_WORDS, BASE_WORDS):
            vals[e, w] = 0
    vals[e, V_FLAGS] = ct_flags_word(F_ORIG_A if a_is_src else 0, aux)
    events[ev0 + E_CREATED] += 1
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    if proto == L.PROTO_TCP:
        ct_tcp(vals, expires, e, 0, pkt, row[L.L3_OFF], row[L.L4_OFF], timeouts, now)
    else:
        ct_other(vals, expires, e, 0, proto, timeouts, now)
    return e


@kernel
def ct_delete(state, info, e):
    tbl_delete(state, info, e)


@kernel
def ct_sweep(state, expires, info, events, ev0, now, budget, expired_before):
    """End of a batch: reclaim expired entries among ``budget`` slots (incremental
    expiry) and count every entry that expired since ``info[I_EXPIRED]`` was
    ``expired_before`` (lookups and inserts reclaim too). Returns True when
    tombstones fill a quarter of the table (time to rebuild it)."""
    tbl_sweep(state, expires, info, now, budget)
    events[ev0 + E_EXPIRED] += info[I_EXPIRED] - expired_before
    return tbl_needs_rebuild(state, info)


__all__ = [
    "Conntrack", "ct_packet", "ct_classify", "ct_classify_at", "ct_first_line", "ct_advance", "FOUND", "ct_create", "ct_delete", "ct_sweep", "ct_make_key",
    "ct_aux", "ct_set_aux", "ct_flags_word", "ct_copy_values",
    "ct_related_key", "ct_quoted", "timeouts_array", "CT_EVENTS", "DEFAULT_TIMEOUTS", "NEW",
    "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "REOPEN", "MAX_FLOWS_LIMIT",
    "TCP_NEXT", "TCP_STATE_NAMES",
]
