"""A firewall in front of a NAT, run as one pass over one connection table.

The edge of an appliance is often a firewall whose port is linked straight to a NAT's
inside port (ARCHITECTURE.md's example: ``[fw.outside, nat.inside]``). Run as two
devices, every packet is looked up in two connection tables of the same
connections: the firewall's entry of a connection and the NAT's original-direction
entry (E1) have the same key, the tuple as the inside sees it. With a million
connections each lookup is a miss in memory, and the pair runs at about two thirds
of one NAT's rate (docs/benchmarks.md). So the engine runs such a pair as Linux
runs its filter and NAT chains: one connection entry per connection, looked up once,
whose first packet the firewall's rules judge. The NAT's kernel does it
(:data:`dva.nf.nat.FILTER_FRONT`): the rules are the firewall's, matched as the
firewall sees each new connection (from the inside: before any translation; from
the outside: after destination translation; a hairpinned connection twice, out and
back in), counted in the firewall's counters, before the NAT makes any entry.

What stays as it was: the appliance (both devices, their names, ports and configs),
the packets each attachment sends (``tests/unit/test_fused.py`` runs the same
traces through the pair fused and as two devices and compares every output byte),
and the counters: :func:`account` counts each packet's path through the two devices
as the separate pair would (the firewall's rx, tx and drops, the link between them,
the NAT's); rule hits and reject answers go to the firewall's counters, and its
conntrack counters are counted as it would have counted them, but
``flows_expired`` (its table stays empty: the NAT's holds the connections, moves
with their buckets and counts their expiry) and ``early_drops``/``flows_refused``
(its table never fills first: see below), which stay 0.

What differs, and is said here: the NAT's ``invalid`` counts also the packets the
firewall finds invalid; a connection the firewall refuses leaves no NAT entry (as
two devices, the NAT had made one before the firewall refused an inbound or
hairpinned connection: its ``flows_created``, ``dnat_flows`` ... counted it, and a
later ICMP error about it was translated before the firewall dropped it, where
fused the NAT drops it); a connection the NAT cannot map is not kept by the
firewall either (its rule hit counts again at the next packet); the NAT's sweep,
which also runs on batches the firewall would have dropped whole, reclaims expired
entries sooner; and a packet crossing the pair counts one hop, not two (only a
wiring loop notices: it ends as ``hop_limit`` a few passes later).

A pair is fused only where the firewall would decide as the NAT's conntrack does:
its ``fragments`` and ``invalid`` are ``drop``, its timeouts are the NAT's, its
``max_flows`` is at least twice the NAT's (it never fills before the NAT, whose
table holds up to two entries a connection), and the NAT has no ``filter`` of its
own. :func:`blockers` says why a linked pair is not fused. Reloads
(:mod:`dva.worker.reload`): a flush of the firewall drops the connections from the
NAT's table (its mappings stay); a reload that ends a fusion fills the firewall's
table from the old NAT's connections (:func:`seed_firewall`), so that no open
connection is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dva._jit import KernelCall, kernel
from dva.graph.plan import Plan
from dva.nf import firewall as fwm
from dva.nf import nat as natm
from dva.nf.base import DROP_BASE, Device, DeviceState
from dva.nf.conntrack import E_CREATED, E_INVALID, E_RELATED, E_REOPENED
from dva.nf.table import record_columns
from dva.nf.xlat import KIND_ORIG, U_META
from dva.packet import layout as L

# the firewall's conntrack counters that follow the NAT's: as two devices, each
# counts these for every connection both see
MIRROR = np.array([E_CREATED, E_REOPENED], np.int64)
# the firewall's drop reason for each of the NAT's (-1: the NAT's alone)
FW_REASON = np.array([fwm.DROPS.index(r) if r in fwm.DROPS else -1
                      for r in natm.DROPS], np.int64)


def blockers(fw: Device, nat: Device) -> list[str]:
    """Why firewall ``fw`` (one port linked to the inside port of ``nat``) cannot run
    fused with it; empty: it can."""
    fc, nc = fw.config, nat.config
    out = []
    if nc.filter is not None:
        out.append("the NAT has a filter of its own")
    if fc.fragments != "drop":
        out.append("the firewall passes fragments")
    if fc.invalid != "drop":
        out.append("the firewall passes invalid packets")
    if not np.array_equal(fw.timeouts, nat.timeouts):
        out.append("their timeouts differ")
    if fc.max_flows < 2 * nc.max_flows:
        out.append("the firewall's max_flows is less than twice the NAT's")
    return out


@dataclass(eq=False)
class FusedPair:
    """Firewall ``fw`` (device index) whose port ``link`` is linked to the inside port
    of NAT ``nat``; ``outer``: the firewall's other port. The fused pass's ports are
    0 (the firewall's ``outer``) and 1 (the NAT's outside)."""

    fw: int
    nat: int
    outer: int
    link: int
    fw_dev: Device
    nat_dev: Device
    rules: np.ndarray = field(init=False)
    cfg: np.ndarray = field(init=False)
    fbase: np.ndarray = field(init=False)
    dest_q: np.ndarray = field(init=False)
    dest_port: np.ndarray = field(init=False)
    max_emit: int = 1  # the firewall's reject answers
    scratch: object = None  # the engine's: counters its routing pass counts into

    def __post_init__(self) -> None:
        fc = self.fw_dev.config
        names = [fc.ports[self.outer], fc.ports[self.link]]
        self.rules = fwm.compile_rules(fc.rules, names)
        self.cfg = self.nat_dev.cfg.copy()
        self.cfg[natm.G_FILTER] = natm.FILTER_FRONT
        self.cfg[natm.G_FDEFAULT] = fwm.ACTIONS[fc.default]
        self.fbase = np.array([fwm.C_RST, fwm.C_DEFAULT, fwm.C_RULES], np.int64)
        # calls typed once, not at every batch by numba's dispatcher (16 arguments)
        self.to_ports = KernelCall(to_fused_ports)  # call .target
        self.account = KernelCall(account)
        self.seen = np.zeros(len(MIRROR), np.int64)  # the NAT's MIRROR counts, counted

    def resync(self, nat_state: DeviceState) -> None:
        """The NAT's counters were set (a reload carried them): follow from there."""
        self.seen[:] = nat_state.events[MIRROR]

    def count(self, meta, n_in: int, n: int, fw_counters, nat_counters,
              fw_state: DeviceState, nat_state: DeviceState) -> None:
        """:func:`account` of rows [0, n) of a pass (``*_counters``: the two devices'
        ``dva.worker.engine.DeviceCounters``)."""
        cf, cn = fw_counters, nat_counters
        self.account.target(meta, n_in, n, self.outer, self.link, FW_REASON, cf.rx, cf.tx,
                            cf.drops, cn.rx, cn.tx, cn.drops, fw_state.events,
                            nat_state.events, self.seen, MIRROR)

    def route(self, plan: Plan) -> None:
        self.dest_q = np.array([plan.dest_q[self.fw][self.outer],
                                plan.dest_q[self.nat][1]], np.int64)
        self.dest_port = np.array([plan.dest_port[self.fw][self.outer],
                                   plan.dest_port[self.nat][1]], np.int64)

    def process(self, batch, state, fw_state, now: float) -> None:
        """The NAT's kernel over ``batch`` (rows' ``IN_PORT`` in the fused numbering)
        with the firewall's rules in front, counting in the firewall's counters."""
        n = self.nat_dev
        n.run(self, batch, state, now, lambda st, rows: n.bind_with(
            st, rows, self.cfg, self.rules, fw_state.events, self.fbase))


def find_pairs(plan: Plan) -> tuple[list[FusedPair], list[str]]:
    """The firewall/NAT pairs of ``plan`` that run fused, and for each linked pair
    that does not, why (``"fw -> nat: reason; ..."``)."""
    pairs, why = [], []
    taken: set[int] = set()
    for f, dev in enumerate(plan.devices):
        if dev.type_name != "firewall":
            continue
        for p in range(2):
            n = int(plan.dest_q[f][p])
            if not 0 <= n < plan.ndev or plan.devices[n].type_name != "nat" \
                    or plan.dest_port[f][p] != 0 or n in taken:
                continue
            if int(plan.dest_q[f][1 - p]) == n:
                continue  # both ports to the NAT: no outer port
            b = blockers(dev, plan.devices[n])
            if b:
                why.append(f"{dev.name} -> {plan.devices[n].name}: {'; '.join(b)}")
                continue
            pair = FusedPair(f, n, 1 - p, p, dev, plan.devices[n])
            pair.route(plan)
            pairs.append(pair)
            taken.add(n)
    return pairs, why


@kernel
def to_fused_ports(meta, n, port):
    """Rows that arrived on the fused pass's port ``port``."""
    for i in range(n):
        meta[i, L.IN_PORT] = port


@kernel
def account(meta, n_in, n, outer, link, fw_reason, rx_f, tx_f, drops_f, rx_n, tx_n,
            drops_n, ev_f, ev_n, seen, mirror):
    """Count rows [0, n) of a fused pass as the two devices would have: each row's
    path from its in-port (0: the firewall's ``outer`` port, 1: the NAT's outside)
    through the firewall, the link, the NAT (and back, hairpinned) to its verdict;
    rows [n_in, n) are the firewall's reject answers (the engine counts them as the
    firewall's emitted rows, and a verdict it cannot honour, a bug, as the NAT's
    invalid one: the misc counters of its routing pass). The firewall's conntrack
    counters: ``mirror`` follow the NAT's (``seen``: how far), a hairpinned
    connection is two of its own (out, and back in; the way out also when it
    refuses the way back), its invalid packets are the ones it drops as such (the
    NAT's count them too), its related ones the ICMP errors that pass."""
    nreasons = drops_n.shape[0]
    for j in range(mirror.shape[0]):
        e = mirror[j]
        ev_f[e] += ev_n[e] - seen[j]
        seen[j] = ev_n[e]
    for i in range(n_in):
        row = meta[i]
        v = row[L.VERDICT]
        note = row[L.NOTE]
        r = DROP_BASE - v if v < 0 else -1
        if r >= nreasons:
            r = -1
        if row[L.IN_PORT] == 0:
            rx_f[outer] += 1
            fw_r = fw_reason[r] if r >= 0 else -1
            if fw_r >= 0 and note != natm.N_HP_DENIED and note != natm.N_HP_REJECTED \
                    and r != natm.D_TABLE_FULL:
                drops_f[fw_r] += 1  # the firewall's, before the link
                if r == natm.D_INVALID:
                    ev_f[E_INVALID] += 1
                continue
            if note == natm.N_HAIRPIN:
                ev_f[E_CREATED] += 1  # the connection coming back in
            tx_f[link] += 1
            rx_n[0] += 1
            if v == 0 or v == 1:
                tx_n[v] += 1
                if note == natm.N_ICMP:
                    ev_f[E_RELATED] += 1
                if v == 0:  # hairpinned: back through the firewall
                    rx_f[link] += 1
                    tx_f[outer] += 1
            elif fw_r >= 0 and r != natm.D_TABLE_FULL:  # the hairpin's second check
                tx_n[0] += 1
                rx_f[link] += 1
                drops_f[fw_r] += 1
                ev_f[E_CREATED] += 1  # the way out, which it let pass
            elif r >= 0:
                drops_n[r] += 1
        else:
            rx_n[1] += 1
            if v == 0 or v == 1:
                tx_n[v] += 1
                if v == 0:
                    rx_f[link] += 1
                    tx_f[outer] += 1
                    if note == natm.N_ICMP:
                        ev_f[E_RELATED] += 1
            elif r == natm.D_DENIED or r == natm.D_REJECTED:  # the firewall's rules
                tx_n[0] += 1
                rx_f[link] += 1
                drops_f[fw_reason[r]] += 1
            elif r >= 0:
                drops_n[r] += 1
    for i in range(n_in, n):  # the firewall's reject answers
        if meta[i, L.NOTE] == natm.N_HP_REPLY:  # out the link, hairpinned back
            tx_f[link] += 1
            rx_n[0] += 1
            tx_n[0] += 1
            rx_f[link] += 1
            tx_f[outer] += 1
        elif meta[i, L.VERDICT] == 0:
            tx_f[outer] += 1
        else:  # out the link, through the NAT to its outside
            tx_f[link] += 1
            rx_n[0] += 1
            tx_n[1] += 1


def seed_firewall(fw_state: DeviceState, nat_state: DeviceState, now: float) -> int:
    """Put the NAT's connections (its E1 entries: the tuple as the inside sees it)
    into the firewall's table, for a firewall that ran fused with the NAT and now
    runs alone; returns how many. The firewall's rule of each is unknown (0)."""
    e = nat_state.ct.table.take_entries(np.arange(nat_state.bucket_mask + 1), now)
    r = e["records"]
    _, _, _, vals = record_columns(r, *(int(w) for w in e["words"]))
    keep = (vals[:, U_META] & 1) == KIND_ORIG
    return fw_state.ct.table.put_entries({"records": r[keep], "words": e["words"]}, now)
