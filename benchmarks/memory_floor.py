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
* ``nat``: 4M slots of 24 words (3 lines), 768 MiB: the NAT's (E1 and E2 of 1M
  connections).

Per table, rows of 256 random slots (a batch), two ways:

* ``cold``: one loop reads a word of every line of each row's record (the core's
  out-of-order window alone overlaps the misses);
* ``ahead``: a loop prefetches every line of each row's record, then the same reads,
  as the devices' run-ahead loops and decision loops do.

Figures are ns per row (a row: a packet). ``fw+nat`` adds the two tables' best:
the memory cost of a packet through ``fw_nat_est`` if nothing else took time; its
reciprocal is the rate that memory alone would allow. Median of ``--runs`` runs.
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
TABLES = {"fw": (1 << 21, 16), "nat": (1 << 22, 24)}  # slots, words per record


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
