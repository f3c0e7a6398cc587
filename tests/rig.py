"""A test rig: an engine over one appliance, fed frame lists, checked every step.

Unit tests drive an :class:`~dva.worker.engine.Engine` directly, so that
``Engine.tick`` can move time; after every step the rig checks
``engine.accounting_errors() == []`` and that no packet slot leaked.
"""

from __future__ import annotations

from dva.graph.appliance import parse_appliance
from dva.graph.plan import compile_plan
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.worker.engine import Engine


class Rig:
    """An engine over one appliance, fed frame lists; checks accounting every step."""

    def __init__(self, text: str, slots: int = 512, fuse: bool = True) -> None:
        self.plan = compile_plan(parse_appliance(text))
        self.pool = PacketPool(slots)
        self.engine = Engine(self.plan, self.pool, fuse=fuse)
        self.names = [a.port for a in self.plan.attachments]

    @property
    def state(self):
        return self.engine.states[0]

    def _collect(self, outputs) -> dict[str, list[bytes]]:
        out = {n: o.frames() for n, o in zip(self.names, outputs)}
        for o in outputs:
            o.release_all()
        self.check()
        return out

    def send(self, port: str, frames: list[bytes], now: float) -> dict[str, list[bytes]]:
        b = PacketBatch(self.pool, max(len(frames), 1))
        b.add_frames(frames)
        return self._collect(self.engine.process(self.names.index(port), b, now))

    def tick(self, now: float) -> dict[str, list[bytes]]:
        return self._collect(self.engine.tick(now))

    def check(self) -> None:
        assert self.engine.accounting_errors() == []
        held = sum(st.held_slots() for st in self.engine.states)
        assert self.pool.available == self.pool.nslots - held, "packet slots leaked"

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.engine.counter_table().items() if v}
