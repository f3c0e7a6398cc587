"""Stateful path on one core, in memory: connection tracking, firewall, firewall + NAT.

    python benchmarks/stateful.py [--flows 1000000] [--runs 5] [--cpu 0] [--only a,b]
                                  [--cold] [--out benchmarks/results/stateful.json]

Measured, each as the median of ``--runs`` runs interleaved round-robin. Each timed
run follows an untimed run of the same step: the step before it was another one,
which left the shared cache full of its own lines (``mem_pace`` and ``fw_nat_est``
sweep it whole), and a step of 1M flows takes a large part of a run to bring its
tables' control bytes (8 MiB for the NAT) back; a worker that keeps running the
same chain keeps them cached. ``--cold`` times every run straight after the other
steps' (about 5% less for ``natf_est``, docs/benchmarks.md).

* ``ct_insert`` / ``ct_lookup`` -- the conntrack table alone (key build + insert, or
  key build + lookup of a random live flow), ``--flows`` UDP flows, one operation
  after the other: operations per second. ``ct_insert`` fills a new table, whose
  pages the kernel supplies on first touch (about ten times a write's cost on these
  VMs); ``ct_insert_resident`` one whose pages exist (as in a worker that has run a
  while).
* ``ct_insert_batched`` / ``ct_lookup_batched`` -- the same, as the devices do it:
  the keys of a batch of 256 built and their slots prefetched in one loop, then
  inserted or looked up.
* ``fw_new`` -- parse + the firewall on packets that each open a new UDP flow (rule
  match, conntrack insert): the rate at which it admits new flows.
* ``fw_est`` -- parse + the firewall on packets of random established flows among
  ``--flows``: lookups and state updates.
* ``nat_est`` -- parse + the NAT alone on the same packets (the chain's NAT part,
  measured by itself: ``fw_nat_est`` costs about ``fw_est`` + ``nat_est`` - a parse).
* ``fw_nat_est`` -- parse + firewall + NAT (source NAT, bucket-keeping ports) on
  packets of random established flows among ``--flows`` tracked ones: the edge
  chain's kernels, batch 256, back to back as a worker runs them.
* ``fw_nat_reply`` -- the same flows' replies (server -> the mapped address and port,
  NAT then firewall, from their outside ports): the NAT finds the translated tuple's
  entry (E2) and translates back, then judges the packet by the connection's own
  entry (E1). Every flow's first reply is sent before the timed runs (the
  connection's state and timeout change, its E2 and mapping are extended then).
* ``natf_est`` / ``natf_reply`` -- the same packets through one NAT whose ``filter``
  holds the firewall's rule (``default: deny``, allow from inside): the same policy
  as the chain, with one connection entry and one lookup per packet instead of two.
  Compare with ``fw_nat_est`` / ``fw_nat_reply``, measured in the same runs.
* ``fw_nat_fused_est`` / ``fw_nat_fused_reply`` -- the chain (firewall + NAT, two
  devices, the firewall's ``max_flows`` twice the NAT's) as the engine runs it:
  fused (``dva.worker.fused``), the NAT's pass with the firewall's rules, then the
  pass that counts each packet as the two devices' (``account``).

* ``mem_pace`` -- the machine's memory pace during the same runs: the first lines
  of random records of the filtering NAT's table (a 1 GiB array at 1M flows), read
  in groups of 256 whose lines are prefetched first (as many misses in flight as the
  core keeps): million lines per second. The 1M-flow figures follow it (it moved
  from about 3 to 25 ns a line between days, ``memory_floor.py``); a figure quoted
  without it cannot be compared with another day's.

Frames are 64-byte UDP/IPv4 (checksum 0) from 10.x.y.z inside hosts to one server;
before each pass a small kernel writes the flow's source address and port into the
batch's frames (the devices rewrite them; counted in the figure). Every run checks
that no packet was dropped. Figures print as a table and go to ``--out`` as JSON.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH = 256
SERVER = 0xC0000209  # 192.0.2.9


def udp_writer():
    """``put(buf, s, src, sport, dst, dport)``, inlined into the fill kernels: the
    64-byte UDP/IPv4 frame at ``buf[s:]`` gets these addresses and ports, UDP
    checksum 0 and its IPv4 header checksum recomputed."""
    from dva._jit import inline_kernel
    from dva.packet.checksum import ipv4_header_checksum, wr16, wr32

    @inline_kernel
    def put(buf, s, src, sport, dst, dport):
        wr32(buf, s + 26, src)
        wr32(buf, s + 30, dst)
        wr16(buf, s + 34, sport)
        wr16(buf, s + 36, dport)
        wr16(buf, s + 40, 0)
        wr16(buf, s + 24, 0)
        wr16(buf, s + 24, ipv4_header_checksum(buf[s:], 14))
    return put


def udp_flow_fill():
    """``fill(data, slots, starts, ids, k0, dst)``: make the batch's 64-byte UDP/IPv4
    frames those of flows ``ids[k0 : k0 + len(slots)]`` (source 10.a.b.c, port 1024 +
    the flow's low bits) to ``dst`` port 53, header checksum recomputed. The devices
    rewrite addresses, so benchmarks write them afresh before every batch (and count
    it in their figures)."""
    from dva._jit import kernel
    put = udp_writer()

    @kernel
    def fill(data, slots, starts, ids, k0, dst):
        j = k0 % ids.shape[0]  # a division a batch: one a frame cost 1.7 ns of it
        for i in range(slots.shape[0]):
            f = ids[j]
            j = j + 1 if j + 1 < ids.shape[0] else 0
            put(data[slots[i]], starts[i], 0x0A000000 | (f >> 4), 1024 + (f & 15), dst, 53)
    return fill


def udp_reply_fill():
    """``fill(data, slots, starts, to, k0, src)``: the batch's frames become replies
    from ``src`` port 53 to the mapped endpoints ``to[k0:]`` (``addr << 16 | port``;
    in the order the flows are sent, so that the benchmark's own reads are
    sequential), header checksum recomputed."""
    from dva._jit import kernel
    put = udp_writer()

    @kernel
    def fill(data, slots, starts, to, k0, src):
        j = k0 % to.shape[0]
        for i in range(slots.shape[0]):
            t = to[j]
            j = j + 1 if j + 1 < to.shape[0] else 0
            put(data[slots[i]], starts[i], src, 53, t >> 16, t & 0xFFFF)
    return fill


def e1_tuples(table, n: int, dst: int):
    """The original and translated tuples (O and T: src, sport, dst, dport each) of
    flows ``0..n-1`` of :func:`udp_flow_fill` to ``dst``, read from their E1
    entries in a nat or lb connection table: where replies go."""
    import numpy as np

    from dva._jit import kernel
    from dva.nf.conntrack import KEY_WORDS, ct_make_key
    from dva.nf.table import tbl_lookup
    from dva.nf.xlat import conn_tuples

    @kernel
    def read(keys, state, vals, expires, info, key, dst, out):
        for f in range(out.shape[0]):
            ct_make_key(key, 0, 17, 0x0A000000 | (f >> 4), 1024 + (f & 15), dst, 53)
            e = tbl_lookup(keys, state, expires, info, key, 1.0)
            t = conn_tuples(keys, vals, e)
            for w in range(8):
                out[f, w] = t[w]

    out = np.zeros((n, 8), np.int64)
    read(table.keys, table.state, table.vals, table.expires, table.info,
         np.zeros(KEY_WORDS, np.int64), dst, out)
    return out


def build(flows: int):
    import numpy as np

    from dva._jit import inline_kernel, kernel, prefetch
    from dva.graph.appliance import parse_appliance
    from dva.graph.plan import compile_plan
    from dva.nf.conntrack import KEY_WORDS, ct_make_key
    from dva.nf.table import (
        tbl_begin_pass,
        tbl_hash,
        tbl_insert,
        tbl_insert_at,
        tbl_lookup,
        tbl_lookup_at,
        tbl_prefetch_ctrl,
        tbl_prefetch_found_rows,
    )
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.build import UDP, Eth, IPv4
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool
    from dva.worker.engine import DeviceCounters
    from dva.worker.fused import find_pairs

    app_text = f"""
appliance: bench
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    rules: [{{action: allow, from: inside}}]
    max_flows: {flows + 16}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: 198.51.100.2-198.51.100.64}}
    max_flows: {flows + 16}
links: [[fw.outside, nat.inside]]
attach:
  fw.inside: {{memory: in}}
  nat.outside: {{memory: out}}
"""
    plan = compile_plan(parse_appliance(app_text))
    fw, nat = plan.devices
    fws, nats = fw.new_state(), nat.new_state()
    (natf,) = compile_plan(parse_appliance(f"""
appliance: bench_natf
devices:
  natf:
    type: nat
    ports: [inside, outside]
    snat: {{to: 198.51.100.2-198.51.100.64}}
    filter: {{default: deny, rules: [{{action: allow, from: inside}}]}}
    max_flows: {flows + 16}
attach:
  natf.inside: {{memory: in}}
  natf.outside: {{memory: out}}
""")).devices
    natfs = natf.new_state()
    # the same chain as the engine runs it: fused (dva.worker.fused), which takes a
    # firewall whose max_flows is at least twice the NAT's (its own table stays empty)
    fplan = compile_plan(parse_appliance(app_text.replace(
        f"max_flows: {flows + 16}\n  nat:", f"max_flows: {2 * (flows + 16)}\n  nat:")))
    (pair,), _ = find_pairs(fplan)
    ffws, fnats = (d.new_state() for d in fplan.devices)
    fcount = [DeviceCounters.for_device(d) for d in fplan.devices]

    class Fused:
        """The fused pair as the engine runs it: the NAT's pass with the firewall's
        rules, then the two devices' counters."""
        name = "fw+nat (fused)"

        def process(self, b, _st, now):
            pair.process(b, fnats, ffws, now)
            pair.count(b.meta, b.n, b.n, *fcount, ffws, fnats)

    fused = Fused()
    pool = PacketPool(4 * BATCH)
    b = PacketBatch(pool, BATCH)
    tmpl = bytes(Eth(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
                 / IPv4(src="10.0.0.1", dst="192.0.2.9") / UDP(sport=1, dport=53, chksum=0)
                 / bytes(18))
    for _ in range(BATCH):
        b.add_frame(tmpl)
    data, meta = pool.data, b.meta
    slots, starts = meta[:BATCH, L.SLOT].copy(), meta[:BATCH, L.START].copy()

    fill = udp_flow_fill()
    rfill = udp_reply_fill()

    @inline_kernel
    def flow_key(key, f):
        ct_make_key(key, 0, 17, 0x0A000000 | (f >> 4), 1024 + (f & 15), SERVER, 53)

    @inline_kernel
    def op(keys, state, bucket, expires, info, key, f, insert, now):
        if insert:
            return tbl_insert(keys, state, bucket, expires, info, key, f & 4095, now + 1e6,
                              now)
        return tbl_lookup(keys, state, expires, info, key, now)

    @kernel
    def ct_ops(keys, state, bucket, expires, info, kbuf, ids, insert, now):
        """One operation after the other (each waits for its own misses)."""
        done = 0
        key = kbuf[0]
        for i in range(ids.shape[0]):
            flow_key(key, ids[i])
            done += op(keys, state, bucket, expires, info, key, ids[i], insert, now) >= 0
        return done

    @kernel
    def ct_ops_batched(keys, state, bucket, expires, info, kbuf, hs, ids, insert, now):
        """As the devices do it: keys of a batch (``kbuf``: BATCH rows) built and
        their home slots' control bytes prefetched in one loop, the records they
        name in a second (``hs``: the hashes, then the candidate slots), then looked
        up or inserted from the candidates."""
        done = 0
        n = ids.shape[0]
        for b0 in range(0, n, kbuf.shape[0]):
            b1 = min(b0 + kbuf.shape[0], n)
            tbl_begin_pass(info)
            for i in range(b0, b1):
                key = kbuf[i - b0]
                flow_key(key, ids[i])
                hs[i - b0] = tbl_hash(key)
                tbl_prefetch_ctrl(state, hs[i - b0])
            tbl_prefetch_found_rows(state, expires, hs, b1 - b0)
            for i in range(b0, b1):
                key = kbuf[i - b0]
                c = hs[i - b0]
                if insert:
                    s = tbl_insert_at(keys, state, bucket, expires, info, key, ids[i] & 4095,
                                      now + 1e6, now, c)
                else:
                    s = tbl_lookup_at(keys, state, expires, info, key, now, c)
                done += s >= 0
        return done

    kbuf = np.zeros((BATCH, KEY_WORDS), np.int64)
    hs = np.zeros(BATCH, np.int64)

    def run_ops(t, ids, insert, batched):
        """Operations per second of inserting (or looking up) the flows ``ids``."""
        t0 = time.perf_counter()
        if batched:
            n = ct_ops_batched(t.keys, t.state, t.bucket, t.expires, t.info, kbuf, hs, ids,
                               insert, 1.0)
        else:
            n = ct_ops(t.keys, t.state, t.bucket, t.expires, t.info, kbuf, ids, insert, 1.0)
        rate = len(ids) / (time.perf_counter() - t0)
        assert n == len(ids)
        return rate

    def fresh_ct(resident=False):
        from dva.nf.conntrack import Conntrack
        c = Conntrack(flows + 16)
        if resident:  # as in a worker that has run a while: the table's pages exist
            c.table.records.fill(0)
        return c

    rng = np.random.default_rng(1)
    ids = np.arange(flows, dtype=np.int64)
    order = rng.permutation(flows).astype(np.int64)

    @kernel
    def ports_and_drops(meta, n, verdict_ok, in_port):
        """IN_PORT ``in_port`` for the next device (the firewall's outside feeds the
        NAT's inside, the NAT's inside the firewall's outside); counts verdicts other
        than ``verdict_ok``."""
        bad = 0
        for i in range(n):
            bad += meta[i, L.VERDICT] != verdict_ok
            meta[i, L.IN_PORT] = in_port
        return bad

    def run_batch(devs, k0, which_ids, now, reply=False):
        """One batch of flows ``which_ids[k0:]`` through ``devs``: from the inside,
        or (``reply``) their replies from the outside."""
        if reply:  # the replies of flows ``order`` (mapped_in_order is theirs)
            assert which_ids is order
            rfill(data, slots, starts, mapped_in_order, k0, SERVER)
        else:
            fill(data, slots, starts, which_ids, k0, SERVER)
        into = 1 if reply else 0  # a device's port the batch comes in by
        b.n = BATCH
        ports_and_drops(meta, BATCH, -999, into)
        parse_batch(data, meta, 0, BATCH, 4095)
        for dev, st in devs:
            dev.process(b, st, now)
            if ports_and_drops(meta, BATCH, 1 - into, into):
                raise AssertionError(f"{dev.name} dropped packets: "
                                     f"{set(meta[:BATCH, L.VERDICT].tolist())}")

    # warm up and fill the tables with every flow (this also compiles everything)
    t0 = time.perf_counter()
    for k in range(0, flows, BATCH):
        run_batch([(fw, fws), (nat, nats)], k, ids, 1.0)
        run_batch([(natf, natfs)], k, ids, 1.0)
        run_batch([(fused, None)], k, ids, 1.0)
    fill_s = time.perf_counter() - t0

    tup = e1_tuples(nats.ct.table, flows, SERVER)  # each flow's NAT address, port
    if not np.array_equal(tup, e1_tuples(natfs.ct.table, flows, SERVER)) or \
            not np.array_equal(tup, e1_tuples(fnats.ct.table, flows, SERVER)):
        raise AssertionError("the filtering NAT or the fused pair mapped the flows otherwise")
    mapped = (tup[:, 4] << 16) | tup[:, 5]
    mapped_in_order = mapped[order]
    # every flow's first reply (it changes the connection's state and timeout, and
    # extends E2 and the mapping): fw_nat_reply then measures established replies
    for k in range(0, flows, BATCH):
        run_batch([(nat, nats), (fw, fws)], k, order, 2.0, reply=True)
        run_batch([(natf, natfs)], k, order, 2.0, reply=True)
        run_batch([(fused, None)], k, order, 2.0, reply=True)
    ct = fresh_ct()
    t = ct.table
    for batched in (False, True):  # compile both
        run_ops(t, ids[:10], True, batched)

    def ct_insert(batched, resident):
        return lambda: run_ops(fresh_ct(resident).table, order, True, batched)

    lookup_ct = fresh_ct()
    lt = lookup_ct.table
    run_ops(lt, ids, True, False)

    def ct_lookup(batched):
        return lambda: run_ops(lt, order, False, batched)

    new_flow = [flows]  # ids never seen: each packet opens a flow

    def fw_new():
        st = fw.new_state()
        nb = min(flows, 262144) // BATCH
        base = np.arange(nb * BATCH, dtype=np.int64) + 16 * flows
        t0 = time.perf_counter()
        for k in range(nb):
            run_batch([(fw, st)], k * BATCH, base, 2.0)
        return nb * BATCH / (time.perf_counter() - t0)

    def established(devs, reply=False):
        def step():
            nb = 2000
            k0 = int(rng.integers(0, flows))
            t0 = time.perf_counter()
            for k in range(nb):
                run_batch(devs, k0 + k * BATCH, order, 3.0, reply)
            return nb * BATCH / (time.perf_counter() - t0)
        return step

    @kernel
    def read_lines(expires, slots):
        """Read the first line of each record ``slots`` names, 256 at a time, each
        group's lines prefetched first."""
        tot = 0.0
        for g in range(0, slots.shape[0], BATCH):
            end = min(g + BATCH, slots.shape[0])
            for i in range(g, end):
                prefetch(expires, slots[i], 0)
            for i in range(g, end):
                tot += expires[slots[i]]
        return tot

    pace_slots = np.random.default_rng(7).integers(0, len(natfs.ct.table.state), 1 << 20)
    read_lines(natfs.ct.table.expires, pace_slots[:BATCH])  # compiled

    def mem_pace():
        t0 = time.perf_counter()
        read_lines(natfs.ct.table.expires, pace_slots)
        return len(pace_slots) / (time.perf_counter() - t0)

    steps = {"ct_insert": ct_insert(False, False),
             "ct_insert_resident": ct_insert(False, True),
             "ct_insert_batched": ct_insert(True, True),
             "ct_lookup": ct_lookup(False), "ct_lookup_batched": ct_lookup(True),
             "fw_new": fw_new,
             "fw_est": established([(fw, fws)]),
             "nat_est": established([(nat, nats)]),
             "fw_nat_est": established([(fw, fws), (nat, nats)]),
             "fw_nat_reply": established([(nat, nats), (fw, fws)], reply=True),
             "natf_est": established([(natf, natfs)]),
             "natf_reply": established([(natf, natfs)], reply=True),
             "fw_nat_fused_est": established([(fused, None)]),
             "fw_nat_fused_reply": established([(fused, None)], reply=True),
             "mem_pace": mem_pace}
    del new_flow
    return steps, fill_s, len(fws.ct.table), len(nats.ct.table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not)")
    ap.add_argument("--only", default="", help="comma-separated step names")
    ap.add_argument("--out", default=str(HERE / "results" / "stateful.json"))
    ap.add_argument("--cold", action="store_true",
                    help="no untimed run of a step before each timed one")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    steps, fill_s, fw_n, nat_n = build(a.flows)
    only = [k for k in a.only.split(",") if k]
    if set(only) - set(steps):
        ap.error(f"unknown steps {sorted(set(only) - set(steps))}; known: {', '.join(steps)}")
    steps = {k: f for k, f in steps.items() if not only or k in only}
    print(f"tables filled: firewall {fw_n} flows, nat {nat_n} entries, in {fill_s:.1f} s")
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.runs):
        for k, f in steps.items():
            if not a.cold:
                f()  # untimed: the step's own lines back in the caches (module doc)
            rates[k].append(f())
    units = {k: "M inserts/s" for k in steps if k.startswith("ct_insert")}
    units.update({k: "M lookups/s" for k in steps if k.startswith("ct_lookup")})
    units.update({k: "M lines/s" for k in steps if k == "mem_pace"})
    rows = {}
    print(f"{'what':20} {'median':>10} {'min':>8} {'max':>8}  unit")
    for k, v in rates.items():
        m = statistics.median(v) / 1e6
        print(f"{k:20} {m:10.2f} {min(v) / 1e6:8.2f} {max(v) / 1e6:8.2f}  "
              f"{units.get(k, 'Mpps')}")
        rows[k] = {"median": m, "runs": [x / 1e6 for x in v], "unit": units.get(k, "Mpps")}
    meta = {"command": "python benchmarks/stateful.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{platform.python_version()}",
            "flows": a.flows, "batch": BATCH, "runs": a.runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
