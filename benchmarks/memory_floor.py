"""What the stateful tables' memory alone costs per packet, on this machine.

    python benchmarks/memory_floor.py [--runs 5] [--cpu 0]
                                      [--out benchmarks/results/memory_floor.json]

A lower bound for ``stateful.py``'s figures with 1M flows: how fast one core reads
one random record per packet from a table of the size and record width the
firewall and the NAT have there, doing nothing else. Each table is a numpy array
with the layout of :class:`dva.nf.table.HashTable` (cache-line aligned records,
every page touched first, so no page faults are timed):

* ``fw``: 2M slots of 16 words (2 cache lines), 256 MiB: the firewall's table for
  1M flows;
* ``nat``: 4M slots of 16 words (2 lines), 512 MiB: the NAT's (E1 and E2 of 1M
  connections; 3 lines, 768 MiB, until 2026-12-05).

Per table, rows of 256 random slots (a batch), two ways:

* ``cold``: one loop reads a word of every line of each row's record (the core's
  out-of-order window alone overlaps the misses);
* ``ahead``: a loop prefetches every line of each row's record, then the same reads,
  as the devices' run-ahead loops and decision loops do.

Figures are ns per row (a row: a packet). ``fw+nat`` adds the two tables' best:
the memory cost of a packet through ``fw_nat_est`` if nothing else took time; its
reciprocal is the rate that memory alone would allow.

Then what a device pays for one connection lookup, on a real
:class:`dva.nf.table.HashTable` of the firewall's geometry (3 key words, the
conntrack's 7 value words: 2 cache lines a record, at half load) with keys of
established flows, a batch of 256 at a time, as the devices do it: a loop that
hashes each key and prefetches its home slot's control bytes, a second loop that
prefetches the record they name (:func:`dva.nf.table.tbl_prefetch_found_rows`), then
the lookups, each from the slot that pass found (:func:`dva.nf.table.tbl_lookup_at`;
with inserts, a full probe: :func:`dva.nf.table.tbl_lookup_inline`). Keys come from an
array, not from frames (no parsing):

* ``lookup_1M``: 950K flows in 2M slots (256 MiB, far larger than the caches);
* ``lookup_1K``: 1K flows (the table fits in the caches): the compute alone;
* ``insert_1M``: the same loops putting 98K new flows into that table (each lookup
  finds nothing, then ``tbl_insert``, inlined as in ``ct_create``): a connection's
  creation.

And whether the memory overlaps a decision loop's compute (``overlap_*``): the
NAT's table again (4M slots of 2 lines, with its control bytes), rows
of 256 random slots, each row's control byte read to find its record (as
:func:`dva.nf.table.tbl_slot_for` does) and the record's lines read, plus a fixed
compute per row that stands for a device's (``OVERLAP_WORK`` dependent loads in a
4 KB array, about 35 ns):

* ``overlap_cached``: a table of 4096 slots (everything cached): the compute and
  reads alone;
* ``overlap_batch``: the control bytes of the batch prefetched in one loop, the
  records in a second, then the compute loop (the devices' run-ahead until
  2026-12-05);
* ``overlap_ahead``: the control bytes in one loop, each record prefetched
  ``dva.nf.table.AHEAD`` rows ahead inside the compute loop
  (:func:`dva.nf.table.tbl_prefetch_found_ahead`, as the devices do now).

``overlap_ahead`` near ``overlap_cached`` means the misses hide behind the compute;
``overlap_batch`` near ``overlap_cached`` plus the record reads alone means they
add up.

Median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 256
ROWS = 4000  # batches per measurement
TABLES = {"fw": (1 << 21, 16), "nat": (1 << 22, 16)}  # slots, words per record
OVERLAP_SLOTS, OVERLAP_WORDS, OVERLAP_WORK = 1 << 22, 16, 25
# lookup_1M: flows held, and new ones insert_1M adds (the limit, their sum, gives the
# firewall's 2M slots at 1M flows; half full after the inserts)
LOOKUP_FLOWS = (950_000, 98_000)


def build_kernels():
    from dva._jit import kernel, prefetch

    @kernel
    def read_rows(recs, slots, words, ahead, out):
        """Read one word of every line of each listed record, a batch at a time;
        ``ahead``: prefetch the batch's lines first."""
        tot = 0
        first = recs[:, 0]
        for b in range(slots.shape[0]):
            row = slots[b]
            if ahead:
                for i in range(row.shape[0]):
                    for off in range(0, words * 8, 64):
                        prefetch(first, row[i], off)
            for i in range(row.shape[0]):
                s = row[i]
                for w in range(0, words, 8):
                    tot += recs[s, w]
        out[0] = tot

    return read_rows


def build_overlap():
    import numpy as np

    from dva._jit import kernel, prefetch
    from dva.nf.table import AHEAD

    chase = np.random.default_rng(5).permutation(512).astype(np.int64)

    @kernel
    def overlap_rows(recs, ctrl, slots, work, ahead, cand, out):
        """Per row of ``slots``: its control byte read (the record's slot depends on
        it), the record's lines read, then ``work`` dependent loads of ``chase``;
        records prefetched batch-wide (``ahead`` 0) or ``AHEAD`` rows ahead."""
        tot = 0
        first = recs[:, 0]
        words = recs.shape[1]
        for b in range(slots.shape[0]):
            row = slots[b]
            n = row.shape[0]
            for i in range(n):
                prefetch(ctrl, row[i], 0)
            lead = AHEAD if ahead else n
            for i in range(min(lead, n)):
                c = row[i] + (ctrl[row[i]] & 0)
                cand[i] = c
                for off in range(0, words * 8, 64):
                    prefetch(first, c, off)
            for i in range(n):
                j = i + lead
                if j < n:
                    c = row[j] + (ctrl[row[j]] & 0)
                    cand[j] = c
                    for off in range(0, words * 8, 64):
                        prefetch(first, c, off)
                s = cand[i]
                v = 0
                for w in range(0, words, 8):
                    v += recs[s, w]
                k = v & 511
                for _ in range(work):
                    k = chase[k]
                tot += k
        out[0] = tot

    return overlap_rows


def build_lookup():
    import numpy as np

    from dva._jit import kernel
    from dva.nf.table import (
        tbl_begin_pass,
        tbl_hash,
        tbl_insert_at,
        tbl_lookup_at,
        tbl_prefetch_ctrl,
        tbl_prefetch_found_rows,
    )

    @kernel
    def look_rows(keys, state, bucket, expires, info, qkeys, insert, hs):
        """Batches of ``BATCH`` keys ``qkeys`` (in the order given: read in sequence,
        as a device reads its batch's frames): prefetch each key's slot in two passes
        (``hs``: the hashes, then their candidate slots), then look it up (and with
        ``insert``, put it in when absent). Returns how many were found (or
        inserted)."""
        done = 0
        for b0 in range(0, qkeys.shape[0], BATCH):
            b1 = min(b0 + BATCH, qkeys.shape[0])
            tbl_begin_pass(info)
            for i in range(b0, b1):
                hs[i - b0] = tbl_hash(qkeys[i])
                tbl_prefetch_ctrl(state, hs[i - b0])
            tbl_prefetch_found_rows(state, expires, hs, b1 - b0)
            for i in range(b0, b1):
                k = qkeys[i]
                c = hs[i - b0]  # from the slot the second pass found, as the devices do
                s = tbl_lookup_at(keys, state, expires, info, k, 1.0, c)
                if insert and s < 0:
                    s = tbl_insert_at(keys, state, bucket, expires, info, k, 0, 1e9, 1.0, c)
                done += s >= 0
        return done

    hs = np.zeros(BATCH, np.int64)
    return lambda keys, state, bucket, expires, info, qkeys, insert: look_rows(
        keys, state, bucket, expires, info, qkeys, insert, hs)


def lookup_tables(flows: int, new: int):
    """A conntrack-shaped table holding ``flows`` keys (inserted), the keys, and
    ``new`` more keys that it does not hold."""
    import numpy as np

    from dva.nf.conntrack import BASE_WORDS, KEY_WORDS
    from dva.nf.table import HashTable

    rng = np.random.default_rng(11)
    qkeys = rng.integers(1, 1 << 62, (flows + new, KEY_WORDS)).astype(np.int64)
    t = HashTable(KEY_WORDS, BASE_WORDS, flows + new)
    look = build_lookup()
    look(t.keys, t.state, t.bucket, t.expires, t.info, qkeys[:flows], True)
    return t, qkeys, look


def table(slots: int, words: int):
    import numpy as np

    raw = np.zeros(slots * words + 8, np.int64)
    off = (-raw.ctypes.data // 8) % 8
    recs = raw[off:off + slots * words].reshape(slots, words)
    recs[:] = 1  # every page exists
    return recs


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not)")
    ap.add_argument("--out", default=str(HERE / "results" / "memory_floor.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    read_rows = build_kernels()
    rng = np.random.default_rng(7)
    tabs = {k: table(*v) for k, v in TABLES.items()}
    out = np.zeros(1, np.int64)
    ns: dict[str, list[float]] = {}
    for _ in range(a.runs):
        for name, recs in tabs.items():
            slots = rng.integers(0, recs.shape[0], (ROWS, BATCH))
            for ahead in (False, True):
                read_rows(recs, slots[:1], recs.shape[1], ahead, out)  # compiled
                t0 = time.perf_counter()
                read_rows(recs, slots, recs.shape[1], ahead, out)
                dt = time.perf_counter() - t0
                ns.setdefault(f"{name}_{'ahead' if ahead else 'cold'}", []).append(
                    dt / (ROWS * BATCH) * 1e9)
    flows, new = LOOKUP_FLOWS
    big, bkeys, look = lookup_tables(flows, new)
    small, skeys, _ = lookup_tables(1 << 10, 0)
    for _ in range(a.runs):
        for name, (t, q, n) in {"lookup_1M": (big, bkeys, flows),
                                "lookup_1K": (small, skeys, 1 << 10)}.items():
            qk = q[rng.integers(0, n, ROWS * BATCH)]
            t0 = time.perf_counter()
            found = look(t.keys, t.state, t.bucket, t.expires, t.info, qk, False)
            dt = time.perf_counter() - t0
            assert found == len(qk)
            ns.setdefault(name, []).append(dt / len(qk) * 1e9)
        # new flows into the 1M table, then out again (the next run finds it as
        # before; deleting is not timed)
        qk = bkeys[flows + rng.permutation(new)]
        live = len(big)
        t0 = time.perf_counter()
        done = look(big.keys, big.state, big.bucket, big.expires, big.info, qk, True)
        dt = time.perf_counter() - t0
        assert done == len(qk) and len(big) == live + len(qk)
        ns.setdefault("insert_1M", []).append(dt / len(qk) * 1e9)
        big.remove_buckets(None, 0.0)
        big.rebuild(0.0)
        look(big.keys, big.state, big.bucket, big.expires, big.info, bkeys[:flows], True)
    overlap = build_overlap()
    cand = np.zeros(BATCH, np.int64)
    big_recs = table(OVERLAP_SLOTS, OVERLAP_WORDS)
    big_ctrl = np.ones(OVERLAP_SLOTS, np.uint8)
    small_recs = table(4096, OVERLAP_WORDS)
    small_ctrl = np.ones(4096, np.uint8)
    for _ in range(a.runs):
        for name, recs, ctrl, ahead in (("overlap_cached", small_recs, small_ctrl, 1),
                                        ("overlap_batch", big_recs, big_ctrl, 0),
                                        ("overlap_ahead", big_recs, big_ctrl, 1)):
            slots = rng.integers(0, recs.shape[0], (ROWS, BATCH))
            overlap(recs, ctrl, slots[:1], OVERLAP_WORK, ahead, cand, out)  # compiled
            t0 = time.perf_counter()
            overlap(recs, ctrl, slots, OVERLAP_WORK, ahead, cand, out)
            ns.setdefault(name, []).append((time.perf_counter() - t0) / (ROWS * BATCH) * 1e9)
    rows = {k: {"median": statistics.median(v), "runs": v, "unit": "ns/row"}
            for k, v in ns.items()}
    best = {t: min(rows[f"{t}_cold"]["median"], rows[f"{t}_ahead"]["median"])
            for t in TABLES}
    floor = best["fw"] + best["nat"]
    rows["fw+nat"] = {"median": floor, "unit": "ns/packet"}
    print(f"{'what':12} {'median':>8} {'min':>8} {'max':>8}  unit")
    for k, v in rows.items():
        r = v.get("runs", [v["median"]])
        print(f"{k:12} {v['median']:8.1f} {min(r):8.1f} {max(r):8.1f}  {v['unit']}")
    print(f"memory alone would allow {1e3 / floor:.1f} Mpps through fw+NAT")
    meta = {"command": "python benchmarks/memory_floor.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{platform.python_version()}",
            "batch": BATCH, "runs": a.runs, "tables": TABLES}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
