"""What ``dva trace`` shows: each device a packet met, and what it decided and why."""

from __future__ import annotations

from dva.graph.plan import Plan
from dva.nf.base import DROP_BASE, HOLD, MULTI
from dva.packet import layout as L
from dva.packet.batch import PacketBatch


class Tracer:
    """Engine hook that records decisions; one instance per traced run."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.events: list[str] = []
        self.step = 0

    def start(self) -> None:
        self.events = []
        self.step = 0

    def __call__(self, d: int, batch: PacketBatch, n_in: int) -> None:
        from dva.packet.spec import describe

        dev = self.plan.devices[d]
        for i in range(batch.n):
            self.step += 1
            row = batch.meta[i]
            where = "generated" if i >= n_in else f"in {dev.ports[row[L.IN_PORT]]}"
            head = f"{self.step}. {dev.name} ({dev.type_name}) {where}"
            if i >= n_in or self.step == 1:
                head += f": {describe(batch.frame(i))}"
            note = int(row[L.NOTE])
            why = dev.notes[note] if 0 < note < len(dev.notes) else ""
            self.events.append(head)
            self.events.append("     " + (why + " -> " if why else "-> ")
                               + self._verdict(d, row))

    def _verdict(self, d: int, row) -> str:
        dev = self.plan.devices[d]
        v = int(row[L.VERDICT])
        if v >= 0:
            return f"out {self._port(d, v)}"
        if v == MULTI:
            ports = [self._port(d, p) for p in range(len(dev.ports)) if (row[L.MASK] >> p) & 1]
            return "out " + ", ".join(ports)
        if v == HOLD:
            return "held by the device"
        r = DROP_BASE - v
        name = dev.drop_reasons[r] if r < len(dev.drop_reasons) else "?"
        return f"DROP /nf/{dev.type_name}/{name}"

    def _port(self, d: int, p: int) -> str:
        dev = self.plan.devices[d]
        q = int(self.plan.dest_q[d][p])
        if q < 0:
            dest = "unconnected: dropped"
        elif q < self.plan.ndev:
            nd = self.plan.devices[q]
            dest = f"to {nd.name}.{nd.ports[self.plan.dest_port[d][p]]}"
        else:
            dest = "attached, leaves the appliance"
        return f"{dev.ports[p]} ({dest})"

    def lines(self, outputs: list[PacketBatch]) -> list[str]:
        res = list(self.events)
        for a, o in enumerate(outputs):
            for i in range(o.n):
                from dva.packet.spec import describe
                res.append(f"=> out {self.plan.attachments[a].ref}: {describe(o.frame(i))}")
        if not any(o.n for o in outputs):
            res.append("=> nothing leaves the appliance")
        return res
