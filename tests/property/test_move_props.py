"""Property: flow state moved between workers by buckets, in any order, stays whole.

Firewall and NAT state of a few hundred TCP/UDP flows (made by real traffic through
an engine) is spread over three "workers" (device states of the same plan) by random
sequences of bucket moves: export from the source, import at the destination, remove
at the source -- what the runtime does. At every step each bucket's entries are on
exactly one worker, and the union of every worker's entries is the original, entry
for entry (key, value, expiry, bucket).
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dva.packet.build import TCP, UDP, Eth, IPv4, Raw
from dva.worker.engine import Engine
from tests.rig import Rig
from tests.runtime_trace import FW_NAT as APPLIANCE

NOW = 10.0
NBUCKETS = 64


def populated() -> Rig:
    rig = Rig(APPLIANCE, slots=4096)
    rig.engine = Engine(rig.plan, rig.pool, nbuckets=NBUCKETS)
    r = random.Random(1)
    frames = []
    for i in range(400):
        host = f"10.0.{i // 200}.{1 + i % 200}"
        remote = f"203.0.113.{r.randrange(1, 250)}"
        l4 = (TCP(sport=2000 + i, dport=80, flags="S", seq=1) if i % 2
              else UDP(sport=2000 + i, dport=53) / Raw(b"q"))
        frames.append(bytes(Eth(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                            / IPv4(src=host, dst=remote) / l4))
    rig.send("inside", frames, 1.0)
    return rig


def entries(states) -> dict[tuple, set]:
    """(device, table) -> entries of every state given, as comparable tuples."""
    out: dict[tuple, set] = {}
    for d, s in enumerate(states):
        for name, t in s.flow_tables.items():
            sel = t.select(None, NOW)
            out.setdefault((d % 2, name), set()).update(
                (tuple(t.keys[i]), tuple(t.vals[i]), float(t.expires[i]), int(t.bucket[i]))
                for i in sel)
    return out


BASE = populated()
ORIGINAL = entries(BASE.engine.states)

moves = st.lists(st.tuples(st.sets(st.integers(0, NBUCKETS - 1), min_size=1, max_size=20),
                           st.integers(0, 2)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moves)
def test_random_move_sequences_keep_every_flow_state(seq):
    assert sum(len(v) for v in ORIGINAL.values()) >= 800  # both devices track flows
    workers = [BASE.engine.states]
    for _ in range(2):
        workers.append([d.new_state() for d in BASE.plan.devices])
        for s in workers[-1]:
            s.bucket_mask = NBUCKETS - 1
    # worker 0 starts with a copy of everything (import into fresh states)
    fresh = [d.new_state() for d in BASE.plan.devices]
    for s, src in zip(fresh, BASE.engine.states):
        s.bucket_mask = NBUCKETS - 1
        s.import_flows(src.export_flows(None, NOW), NOW)
    workers[0] = fresh
    owner = np.zeros(NBUCKETS, np.int64)
    for buckets, dst in seq:
        b = np.array(sorted(buckets), np.int64)
        for src in range(3):
            part = b[owner[b] == src]
            if src == dst or not len(part):
                continue
            for s_src, s_dst in zip(workers[src], workers[dst]):
                s_dst.import_flows(s_src.export_flows(part, NOW), NOW)
                s_src.remove_flows(part, NOW)
        owner[b] = dst
        # each bucket's entries live on its owner only
        for w in range(3):
            for s in workers[w]:
                for t in s.flow_tables.values():
                    got = t.bucket[t.select(None, NOW)]
                    assert (owner[got] == w).all()
    union = entries([s for w in workers for s in w])
    assert union == ORIGINAL
