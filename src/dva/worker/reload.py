"""Config reload: a new generation of an appliance takes over a running engine.

A reload swaps the engine at a batch boundary and keeps what traffic depends on: flow
state (open connections keep passing even when the new rules would refuse them),
shared state, and the counters of devices that did not change. In order:

1. :func:`prepare` builds the new generation from an appliance that was validated
   whole (loaded): plan, a new :class:`Engine` on the same pool, bucket count, tenant
   and hop limit, and compiles its kernels on a throwaway engine. Its attachments must
   be the running ones (same ``device.port``, kind and target: the ports stay open
   across a reload), else :class:`ReloadRejected`. It only reads the running engine,
   so it may run in another thread while that engine forwards (``dva run`` does).
2. The caller keeps running the old engine until no device holds a packet (``HOLD``,
   e.g. a router waiting for an ARP reply) or ``HOLD_DRAIN`` seconds have passed, so
   that held packets normally leave the old generation the ordinary way.
3. :func:`swap`:

   a. :func:`carry_state`: for every device of the new generation with the same name
      and type as one of the old (unless its new config asks for a flush:
      ``Device.flush_on_reload``), the old state's flow tables (every bucket) are
      imported into the new state; its shared tables too, but only when the device's
      port names are unchanged (the built-in shared tables store port numbers: a
      switch's MAC table, a router's ARP cache). An import that fails (tables of
      other shapes: ``ValueError``; a smaller limit: ``TableFull``) is reported and
      the device starts with fresh state; other devices start fresh too. A
      firewall and NAT that run fused (:mod:`dva.worker.fused`) keep their
      connections in the NAT's table: a flush of the firewall flushes them there
      (the NAT's mappings stay), and a reload that ends the fusion fills the
      firewall's table from the NAT's connections.
   b. :func:`release_held`: whatever the old generation still holds is pushed out by
      a tick of the holding devices at a time beyond any hold limit, so each device
      drops it under its own named reason (the router: ``arp_timeout``) and frees
      its slots. A device that still holds packets after that is reported (its slots
      stay taken).
   c. :func:`carry_counters`: devices whose name, type and port names are unchanged
      keep their counters (rx, tx, drops, held, ... and, by name, their event
      counters; counters a device defines per config item, like a firewall's
      ``ruleN_hits``, only when its config is unchanged); the others start at 0, and
      the rx/tx they had counted move to ``Engine.retired_rx``/``retired_tx`` so
      the appliance's balance (``Engine.accounting_errors``) stays exact. Attachment
      counters, graph drops and injected packets carry over whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dva.graph.appliance import Appliance
from dva.graph.plan import Plan, compile_plan
from dva.nf.table import TableFull
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.worker.engine import DeviceCounters, Engine
from dva.worker.fused import seed_firewall

HOLD_DRAIN = 1.0  # seconds the old generation may take to release held packets
# A tick this far in the future is past any hold limit (the router's arp_hold is at
# most 3600 s), so devices drop what they still hold under their own reasons.
HOLD_FLUSH_AFTER = 86400.0


class ReloadRejected(ValueError):
    """The new generation cannot replace the running one; ``problems``: one line each."""

    def __init__(self, reason: str, problems: list[str] | None = None) -> None:
        self.reason = reason
        self.problems = problems or []
        super().__init__("\n".join([reason, *self.problems]))


@dataclass
class SwapReport:
    """What a swap did, device by device."""

    state_kept: list[str] = field(default_factory=list)
    fresh: dict[str, str] = field(default_factory=dict)  # device -> why its state is new
    counters_kept: list[str] = field(default_factory=list)
    counters_restarted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed imports, packets lost
    held_dropped: int = 0  # packets the old generation still held, dropped by devices
    outputs: list[PacketBatch] = field(default_factory=list)  # old engine's, to send

    def summary(self) -> str:
        parts = []
        if self.state_kept:
            parts.append("state kept: " + ", ".join(self.state_kept))
        if self.fresh:
            parts.append("fresh state: " + ", ".join(f"{d} ({why})"
                                                     for d, why in self.fresh.items()))
        if self.counters_restarted:
            parts.append("counters restarted: " + ", ".join(self.counters_restarted))
        if self.held_dropped:
            parts.append(f"{self.held_dropped} held packets dropped by their devices")
        return "; ".join(parts)


def _attach_key(att) -> tuple[str, str, str]:
    return (att.ref, att.spec.kind, str(att.spec.target))


def attachment_problems(old: Plan, new: Plan) -> list[str]:
    """Why the new plan's attachments are not the running ones (empty: they are)."""
    before = {_attach_key(a) for a in old.attachments}
    after = {_attach_key(a) for a in new.attachments}
    problems = [f"attachment {ref}: {{{kind}: {target}}} is new" for ref, kind, target
                in sorted(after - before)]
    problems += [f"attachment {ref}: {{{kind}: {target}}} is gone" for ref, kind, target
                 in sorted(before - after)]
    return problems


def attachment_order(old: Plan, new: Plan) -> list[int]:
    """For each attachment of ``new``, its index in ``old`` (same attachment set)."""
    index = {_attach_key(a): i for i, a in enumerate(old.attachments)}
    return [index[_attach_key(a)] for a in new.attachments]


def prepare(app: Appliance, old: Engine) -> Engine:
    """The new generation's engine (fresh state, counters at 0), kernels compiled.

    Raises :class:`ReloadRejected` when the attachments differ from the running ones.
    """
    plan = compile_plan(app)
    problems = attachment_problems(old.plan, plan)
    if problems:
        raise ReloadRejected("attachments cannot change while running (restart dva run "
                             "for that)", problems)
    engine = Engine(plan, old.pool, tenant_id=old.tenant_id,
                    nbuckets=old.bucket_mask + 1, hop_limit=old.hop_limit, fuse=old.fuse)
    Engine(plan, PacketPool(256), tenant_id=old.tenant_id, nbuckets=old.bucket_mask + 1,
           hop_limit=old.hop_limit, fuse=old.fuse).warm()
    return engine


def held_packets(engine: Engine) -> int:
    return sum(st.held_slots() for st in engine.states)


def _old_device(old: Engine, name: str) -> int | None:
    for i, d in enumerate(old.plan.devices):
        if d.name == name:
            return i
    return None


def carry_state(old: Engine, new: Engine, now: float, report: SwapReport | None = None
                ) -> SwapReport:
    """Import the old states' tables into the new states (see the module docstring)."""
    report = report or SwapReport()
    # a NAT that runs fused with a firewall holds the firewall's connections too
    # (dva.worker.fused): they go with the firewall's flush, the mappings stay
    flush_with = {new.plan.devices[p.nat].name: new.plan.devices[p.fw].name
                  for p in new.fused if new.plan.devices[p.fw].flush_on_reload}
    for d, dev in enumerate(new.plan.devices):
        o = _old_device(old, dev.name)
        if o is None:
            report.fresh[dev.name] = "new device"
            continue
        odev = old.plan.devices[o]
        if odev.type_name != dev.type_name:
            report.fresh[dev.name] = f"was a {odev.type_name}"
            continue
        if dev.flush_on_reload:
            report.fresh[dev.name] = "its config asks for a flush"
            continue
        src, dst = old.states[o], new.states[d]
        if dev.name in flush_with:
            if odev.ports == dev.ports:
                dst.import_shared(src.export_shared(now), now)
            report.fresh[dev.name] = (f"its connections go with {flush_with[dev.name]}'s "
                                      f"flush: they run fused")
            continue
        try:
            dst.import_flows(src.export_flows(None, now), now)
            if odev.ports == dev.ports:
                dst.import_shared(src.export_shared(now), now)
        except (ValueError, TableFull) as e:
            new.states[d] = dev.new_state()
            report.fresh[dev.name] = "its state did not fit"
            report.problems.append(f"{dev.name}: state not carried over ({e}); it starts "
                                   f"with fresh state")
            continue
        report.state_kept.append(dev.name)
        if odev.ports != dev.ports and src.shared_tables:
            report.problems.append(f"{dev.name}: ports changed: its shared tables "
                                   f"({', '.join(src.shared_tables)}) start empty")
    _unfuse(old, new, now, report)
    return report


def _unfuse(old: Engine, new: Engine, now: float, report: SwapReport) -> None:
    """A firewall that ran fused with its NAT (dva.worker.fused) and now runs alone
    gets the connections the NAT held (also when the NAT's new config flushes its
    own), so that none of them is cut."""
    still = {(new.plan.devices[p.fw].name, new.plan.devices[p.nat].name) for p in new.fused}
    for p in old.fused:
        fw, nat = old.plan.devices[p.fw].name, old.plan.devices[p.nat].name
        if (fw, nat) in still or fw not in report.state_kept:
            continue
        try:
            seed_firewall(new.states[new.plan.device_index(fw)], old.states[p.nat], now)
        except TableFull as e:
            report.problems.append(f"{fw}: the connections it ran fused with {nat} did "
                                   f"not all fit its table ({e})")


def release_held(old: Engine, now: float, report: SwapReport | None = None) -> SwapReport:
    """Make the old generation's devices drop what they still hold (module docstring);
    ``report.outputs`` gets what they sent out of attachments meanwhile."""
    report = report or SwapReport()
    holding = [d for d, st in enumerate(old.states) if st.held_slots()]
    if not holding:
        return report
    before = held_packets(old)
    report.outputs = old.tick(now + HOLD_FLUSH_AFTER, devices=holding)
    left = held_packets(old)
    report.held_dropped = before - left
    if left:
        names = ", ".join(old.plan.devices[d].name for d, st in enumerate(old.states)
                          if st.held_slots())
        report.problems.append(f"{left} packets still held by the old generation ({names}) "
                               f"were abandoned: their slots stay taken")
    return report


def carry_counters(old: Engine, new: Engine, report: SwapReport | None = None) -> SwapReport:
    """Carry counters over (module docstring); keeps ``accounting_errors`` exact."""
    report = report or SwapReport()
    kept_old: set[int] = set()
    for d, dev in enumerate(new.plan.devices):
        o = _old_device(old, dev.name)
        if o is None:
            continue
        odev = old.plan.devices[o]
        if odev.type_name != dev.type_name or odev.ports != dev.ports:
            report.counters_restarted.append(dev.name)
            continue
        kept_old.add(o)
        report.counters_kept.append(dev.name)
        oc = old.counters[o]
        c = DeviceCounters.for_device(dev)
        c.rx[:] = oc.rx
        c.tx[:] = oc.tx
        c.misc[:] = oc.misc
        reasons = {r: i for i, r in enumerate(odev.drop_reasons)}
        for r, name in enumerate(dev.drop_reasons):
            if name in reasons:
                c.drops[r] = oc.drops[reasons[name]]
        new.counters[d] = c
        # Event counters by name; names a device makes per config item only if the
        # config is the same (a firewall's rule3_hits may be another rule now).
        fixed = set(type(dev).counters) | ({*dev.counters} if odev.config == dev.config
                                            else set())
        events = {n: i for i, n in enumerate(odev.counters)}
        ev = new.states[d].events
        for e, name in enumerate(dev.counters):
            if name in fixed and name in events:
                ev[e] = old.states[o].events[events[name]]
    retired = [o for o in range(old.plan.ndev) if o not in kept_old]
    new.retired_rx = old.retired_rx + sum(int(old.counters[o].rx.sum()) for o in retired)
    new.retired_tx = old.retired_tx + sum(int(old.counters[o].tx.sum()) for o in retired)
    order = attachment_order(old.plan, new.plan)
    new.attach_rx[:] = old.attach_rx[order]
    new.attach_tx[:] = old.attach_tx[order]
    new.graph_drops[:] = old.graph_drops
    new.injected = old.injected
    for fp in new.fused:  # its firewall's conntrack counters follow the NAT's from here
        fp.resync(new.states[fp.nat])
    return report


def swap(old: Engine, new: Engine, now: float) -> SwapReport:
    """Hand everything over from ``old`` to ``new`` at a batch boundary: state, then
    held packets, then counters (in that order: releasing held packets changes the
    old counters, not the exported state). Send ``report.outputs`` (through the old
    engine's attachment order) and release them before ``old``'s next use."""
    report = carry_state(old, new, now)
    release_held(old, now, report)
    carry_counters(old, new, report)
    return report

