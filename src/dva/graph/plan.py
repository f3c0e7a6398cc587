"""Compile a validated appliance into an execution plan for a worker.

The plan numbers everything: devices ``0..D-1``, attachments ``0..A-1``, and
"queues" -- a packet leaving a device port goes to queue ``q``: ``q < D`` is that
device's input, ``q >= D`` is attachment ``q - D`` (out to the world), ``-1`` is an
unconnected port. For every device the plan holds two arrays indexed by port:
``dest_q`` and ``dest_port`` (the port index at the receiving device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dva.graph.appliance import Appliance, Attachment
from dva.nf.base import Device

GRAPH_DROPS = (
    "unconnected",  # sent out a port that is neither linked nor attached
    "hop_limit",  # passed through too many devices (a wiring loop)
    "pool_exhausted",  # no free packet slot for a copy
    "empty_flood",  # a MULTI verdict with no port in its mask
    "bad_verdict",  # a device gave a port or reason it does not have
)
(G_UNCONNECTED, G_HOP_LIMIT, G_POOL, G_EMPTY, G_BAD_VERDICT) = range(len(GRAPH_DROPS))


@dataclass
class Plan:
    appliance: Appliance
    devices: list[Device]
    attachments: list[Attachment]
    dest_q: list[np.ndarray]
    dest_port: list[np.ndarray]
    entry: list[tuple[int, int]]  # attachment -> (device, port)

    @property
    def ndev(self) -> int:
        return len(self.devices)

    def device_index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise KeyError(name)


def compile_plan(app: Appliance) -> Plan:
    devices = list(app.devices.values())
    idx = {d.name: i for i, d in enumerate(devices)}
    dest_q = [np.full(len(d.ports), -1, np.int64) for d in devices]
    dest_port = [np.full(len(d.ports), -1, np.int64) for d in devices]
    for (da, pa), (db, pb) in app.links:
        ia, ib = idx[da], idx[db]
        qa, qb = devices[ia].port_index[pa], devices[ib].port_index[pb]
        dest_q[ia][qa], dest_port[ia][qa] = ib, qb
        dest_q[ib][qb], dest_port[ib][qb] = ia, qa
    entry = []
    for a_i, att in enumerate(app.attachments):
        d = idx[att.device]
        p = devices[d].port_index[att.port]
        dest_q[d][p] = len(devices) + a_i
        dest_port[d][p] = 0
        entry.append((d, p))
    return Plan(app, devices, list(app.attachments), dest_q, dest_port, entry)
