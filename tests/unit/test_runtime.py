"""The multi-process runtime: rings, slot ownership, worker-count invariance, steering.

The invariance test runs one trace (switch, router, stateful firewall, NAT with a
port forward) inline and with 1, 2 and 4 worker processes, and compares what came
out of every port (as multisets, and per flow in order) and every device counter.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter, defaultdict

import numpy as np
import pytest

from dva.dispatch.offline import OfflineRunner
from dva.dispatch.runtime import Runtime
from dva.graph.appliance import parse_appliance
from dva.packet.pool import PacketPool
from dva.packet.ring import (
    DESC_WORDS,
    ring_count,
    ring_init,
    ring_pop,
    ring_push,
    ring_words,
)
from dva.ports.offline import MemoryPort
from tests import runtime_trace as T

# -- rings --------------------------------------------------------------------------


def test_ring_fifo_bounded_and_wraps():
    ring = np.zeros(ring_words(8), np.int64)
    ring_init(ring, 8)
    src = np.arange(12 * DESC_WORDS, dtype=np.int64).reshape(12, DESC_WORDS)
    assert ring_push(ring, src, 0, 12) == 8  # full: the rest refused, not overwritten
    assert ring_count(ring) == 8
    dst = np.zeros((12, DESC_WORDS), np.int64)
    assert ring_pop(ring, dst, 5) == 5
    assert (dst[:5] == src[:5]).all()
    assert ring_push(ring, src, 8, 4) == 4  # wraps around the end
    assert ring_pop(ring, dst, 12) == 7
    assert (dst[:3] == src[5:8]).all() and (dst[3:7] == src[8:12]).all()
    assert ring_count(ring) == 0
    with pytest.raises(ValueError):
        ring_words(6)


def _producer(ring, n):
    src = np.zeros((64, DESC_WORDS), np.int64)
    i = 0
    while i < n:
        k = min(64, n - i)
        for j in range(k):
            src[j, :] = i + j
        done = 0
        while done < k:
            done += ring_push(ring, src, done, k - done)
        i += k


def test_ring_between_processes_keeps_every_descriptor_in_order():
    import mmap
    n = 200_000
    words = ring_words(256)
    m = mmap.mmap(-1, words * 8, flags=mmap.MAP_SHARED)
    ring = np.ndarray(words, np.int64, buffer=m)
    ring_init(ring, 256)
    p = mp.get_context("fork").Process(target=_producer, args=(ring, n))
    p.start()
    dst = np.zeros((256, DESC_WORDS), np.int64)
    seen = 0
    while seen < n:
        k = ring_pop(ring, dst, 256)
        if k:
            # every word of every descriptor is its sequence number: a torn or
            # reordered read shows as a mismatch
            exp = np.arange(seen, seen + k)[:, None]
            assert (dst[:k] == exp).all()
            seen += k
    p.join(30)
    assert p.exitcode == 0 and ring_count(ring) == 0


# -- slot ownership -----------------------------------------------------------------


def test_pool_returns_foreign_slots_to_their_owner():
    pool = PacketPool(64, own=(16, 32))
    assert pool.available == 16 and pool.owned == 16
    slots = [pool.alloc() for _ in range(16)]
    assert sorted(slots) == list(range(16, 32))
    assert pool.available == 0
    pool.release(3)  # the dispatcher's, say
    pool.release(40)
    pool.release(20)
    assert pool.available == 1
    assert pool.take_returns(1).tolist() == [3]
    pool.release(5)
    assert pool.take_returns().tolist() == [40, 5]
    assert pool.take_returns().tolist() == []
    with pytest.raises(ValueError):
        PacketPool(64, own=(10, 70))


# -- the runtime on a trace -----------------------------------------------------------

# Events of shared-table replicas: each worker counts what *it* learned (a MAC, an ARP
# entry) before a replication round brought it the others' entries, so with N workers
# these count up to N times what one worker counts. Every other counter must match.
REPLICA_EVENTS = (" learned", " arp_learned")


def _run(trace, workers: int):
    mem = {}
    for name in ("h1", "h2", "srv", "wan"):
        ref = T.PORTS[name]
        mem[name] = MemoryPort(ref, [(t, f) for t, p, f in trace if p == ref])
    app = T.app()
    if workers == 0:
        with OfflineRunner(app, memory=mem) as r:
            res = r.run()
            assert res.accounting_errors == []
            counters = res.counters
        load = None
    else:
        rt = Runtime([app], workers=workers, live=False, memory=mem)
        try:
            counters = rt.run_offline()
            assert rt.final_errors == []
            # every dispatcher slot came home
            assert rt.pool.available == rt.pool.owned
            load = [s["apps"][0]["counters"]["attach lan.h1 rx"]
                    + s["apps"][0]["counters"]["attach nat.outside rx"]
                    for s in rt.final_snaps]
        finally:
            rt.close()
    out = {name: [f for _, f in port.sent] for name, port in mem.items()}
    return out, counters, load


def _per_flow(frames):
    d = defaultdict(list)
    for f in frames:
        d[T.flow_key(f)].append(f)
    return d


@pytest.fixture(scope="module")
def trace():
    return T.build(seed=7)


@pytest.fixture(scope="module")
def inline(trace):
    return _run(trace, 0)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_worker_count_invariance(trace, inline, workers):
    ref_out, ref_c, _ = inline
    out, c, load = _run(trace, workers)
    for port in ref_out:
        assert Counter(out[port]) == Counter(ref_out[port]), port
        assert _per_flow(out[port]) == _per_flow(ref_out[port]), port
    dev = {k: v for k, v in ref_c.items()
           if not k.endswith(REPLICA_EVENTS)}
    for k, v in dev.items():
        assert c.get(k) == v, (k, c.get(k), v)
    for k, v in c.items():
        if k.startswith("bus "):
            assert v == 0, k
    if workers > 1:
        assert sum(1 for x in load if x > 0) == workers  # every worker had traffic


def test_replies_reach_the_owner_of_the_flow(trace, inline):
    """With several workers, replies of NATed and port-forwarded flows find their
    connection: the NAT created exactly one connection per flow of the trace."""
    _, c, _ = _run(trace, 2)
    flows = 60 + 40 + 10 + 20
    assert c["nat snat_flows"] == 60 + 40 + 10
    assert c["nat dnat_flows"] == 20
    assert c["nat flows_created"] == flows
    assert c["fw flows_created"] == flows
    assert c["nat drop/invalid"] == 0 and c["fw drop/denied"] == 0
    assert c["nat untranslated_flows"] == 0


def test_port_forward_replies_share_the_bucket_of_the_original():
    """The alias of the port forward puts (srv, 80) -> client in the bucket of
    client -> (PUB, 8080): the dispatcher steers both to one worker."""
    from dva.graph.plan import compile_plan
    from dva.packet.batch import PacketBatch
    from dva.packet.build import TCP, Eth, IPv4
    from dva.packet.parse import parse
    from dva.packet.steer import alias_buckets
    from dva.worker.engine import Engine

    eng = Engine(compile_plan(T.app()), PacketPool(64))
    pool = eng.pool
    b = PacketBatch(pool, 4)
    b.add_frame(bytes(Eth() / IPv4(src="192.0.2.9", dst=T.PUB) / TCP(sport=4000, dport=8080)))
    b.add_frame(bytes(Eth() / IPv4(src="10.0.0.50", dst="192.0.2.9") / TCP(sport=80, dport=4000)))
    b.add_frame(bytes(Eth() / IPv4(src="10.0.0.11", dst="192.0.2.9") / TCP(sport=80, dport=4000)))
    parse(b)
    raw = b.meta[:3, 6].copy()
    alias_buckets(pool.data, b.meta, 0, 3, eng.alias, 4095)
    got = b.meta[:3, 6]
    assert raw[0] != raw[1]  # on the wire the two directions hash apart
    assert got[0] == got[1]  # aliased, they meet
    assert got[2] == raw[2]  # other endpoints keep their bucket


def test_runtime_refuses_bad_settings():
    app = parse_appliance(T.APPLIANCE.replace("memory", "memory"))
    with pytest.raises(ValueError):
        Runtime([app], workers=0, live=False)
    with pytest.raises(ValueError):
        Runtime([app], workers=1, live=False, nbuckets=1000)


def test_a_killed_worker_is_restarted_and_nothing_else_is_lost():
    import os
    import signal
    import time

    from dva.packet.build import UDP, Eth, IPv4

    text = """
appliance: s
devices:
  sw: {type: switch, ports: [a, b]}
attach:
  sw.a: {memory: a}
  sw.b: {memory: b}
"""
    frames = [(i * 1e-4, bytes(Eth(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                               / IPv4(src="10.0.0.1", dst="10.0.0.2")
                               / UDP(sport=1000 + i % 500, dport=53))) for i in range(3000)]
    mem = {"a": MemoryPort("sw.a", frames), "b": MemoryPort("sw.b")}
    rt = Runtime([parse_appliance(text)], workers=2, live=False, memory=mem)
    try:
        victim = rt.workers[0].proc
        rt._request(0, ("counters",), lambda reply: None)  # a request it never answers
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        # the manager's loop goes on with a dead worker until its health check
        assert rt._poll_replies(0) is None
        assert rt._request(0, ("counters",)) is False
        rt.replicate(0.0)
        t0 = time.monotonic()
        rt._check_workers()
        assert rt.workers[0].proc.pid != victim.pid and rt.workers[0].proc.is_alive()
        assert rt.call(0, ("counters",))["generation"] == 1  # it answers, current gen
        assert time.monotonic() - t0 < 2.0
        c = rt.run_offline()
    finally:
        rt.close()
    assert c["worker w0 restarts"] == 1 and c["worker w1 restarts"] == 0
    assert len(mem["b"].sent) == 3000  # both workers forwarded everything after it
    assert c["bus w0 drop/worker_died"] == 0  # killed before any traffic: nothing lost
    assert rt.final_errors == []
    assert rt.pool.available == rt.pool.owned


def test_a_run_takes_its_time_from_its_first_packet_not_a_returned_slot():
    """A slot handed back (``K_FREE``, no time) ahead of packets in a worker's ring
    must not make the packets' ``now`` 0: leases, MACs and connections made at time
    0 would all be expired at the next real time."""
    from dva.packet import layout as L
    from dva.packet.ring import D_APP, D_ATTACH, D_KIND, D_SLOT, D_TIME, K_FREE, K_PKT
    from dva.worker.proc import take_run

    pool = PacketPool(8, own=(0, 8))
    taken = [pool.alloc() for _ in range(3)]
    desc = np.zeros((3, DESC_WORDS), np.int64)
    desc[0, D_KIND], desc[0, D_SLOT] = K_FREE, taken[0]
    for i in (1, 2):
        desc[i, D_KIND], desc[i, D_SLOT] = K_PKT, taken[i]
        desc[i, D_APP], desc[i, D_ATTACH], desc[i, D_TIME] = 0, 1, 5_000_000_000 + i
    meta = np.zeros((4, L.NFIELDS), np.int64)
    before = pool.available
    i, n, app, att, t_ns = take_run(desc, 0, 3, meta, pool.free, pool.top)
    assert (i, n, app, att) == (3, 2, 0, 1)
    assert t_ns == 5_000_000_001
    assert pool.available == before + 1  # the returned slot is free again
    assert list(meta[:2, L.SLOT]) == taken[1:]


def test_dhcp_leases_have_one_owner_and_persist_through_the_runtime(tmp_path):
    """Every DHCP message lands in one bucket, so one worker owns the leases: a
    release is not brought back by a replica (replication never deletes), and the
    manager saves the owner's leases, which the next run starts with."""
    from scapy.layers.dhcp import BOOTP
    from scapy.layers.l2 import Ether
    from test_dhcp import SRV, SRV_MAC, A, B, appliance, msg

    from dva.packet.steer import flow_buckets, plan_aliases

    text = appliance("{start: 10.0.0.100, end: 10.0.0.100}")
    ip = "10.0.0.100"
    frames = [msg("discover", A), msg("request", A, opts=(("server_id", SRV),
                                                           ("requested_addr", ip))),
              msg("release", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC,
                  opts=(("server_id", SRV),)),
              msg("discover", B, xid=9), msg("request", B, xid=9, opts=(
                  ("server_id", SRV), ("requested_addr", ip)))]
    app = parse_appliance(text)
    from dva.graph.plan import compile_plan
    alias = plan_aliases(compile_plan(app))
    assert len(set(flow_buckets(frames, alias=alias).tolist())) == 1
    assert len(set(flow_buckets(frames).tolist())) > 1  # without the alias: spread

    def run(inputs):
        mem = {"lan": MemoryPort("dhcp.lan", inputs)}
        rt = Runtime([parse_appliance(text)], workers=2, live=False, memory=mem,
                     state_dir=str(tmp_path))
        try:
            c = rt.run_offline()
        finally:
            rt.close()
        return [(Ether(f)[BOOTP].xid, Ether(f)[BOOTP].yiaddr) for _, f in mem["lan"].sent], c

    # a second apart: replication rounds (every 0.1 s) between every message
    out, c = run([(1.0 + k, f) for k, f in enumerate(frames)])
    assert out == [(7, ip), (7, ip), (9, ip), (9, ip)], out  # B got it after A released
    assert c["dhcp leases_released"] == 1 and c["dhcp leases_bound"] == 2
    saved = list((tmp_path / "default" / "t").glob("dhcp.state"))
    assert saved, list(tmp_path.rglob("*"))
    # the next run starts with B's lease: A finds the pool exhausted
    out, c = run([(6.0, msg("discover", A, xid=11))])
    assert out == [] and c["dhcp drop/pool_exhausted"] == 1
