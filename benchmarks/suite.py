"""The benchmark suite: dva against its peers, side by side, in one command.

    python benchmarks/suite.py [--runs 5] [--parts compute,io,scaling,tenants] [--quick]
                               [--out benchmarks/results/suite.json]
                               [--plot docs/benchmarks-suite.png]

Parts (each also runs alone; see its module):

* ``compute`` (``benchmarks/compute.py``): switch, router (100k routes), firewall (1k
  rules) + conntrack, NAT, LB, VXLAN and the edge chain switch -> router -> firewall
  -> NAT on in-memory batches of 64-byte frames, one core, batch 32/256/2048, 1 and
  1M flows; against the same code with numba's JIT off and a scapy implementation;
* ``io`` (``benchmarks/io_peers.py``): src -- forwarder -- dst over veths, trafgen
  64-byte UDP frames: dva router and dva router+firewall+NAT against the Linux
  kernel, the kernel with nftables conntrack + masquerade, and Open vSwitch's
  userspace datapath (AF_PACKET and AF_XDP ports, with and without ct); delivered
  and offered Mpps, loss, Mpps per busy core of the forwarder, ratios per run;
* ``scaling`` (``benchmarks/runtime.py``'s chain): a router chain inline, on 1 and on
  2 worker processes;
* ``tenants`` (``benchmarks/tenants.py``): memory and start time per appliance for
  1, 100 and 1,000 small tenant appliances in one instance.

Prints a table per part, writes every figure to ``--out`` (JSON, rewritten after each
part; with ``--parts`` naming only some, the other parts already in the file stay)
and a plot of Mpps per scenario to ``--plot`` (PNG). ``--quick`` runs fewer and
shorter passes (for a first look, not for the record). The io part needs root,
trafgen (apt-get install netsniff-ng), nft (nftables) and, for its OVS rows,
ovs-vswitchd (openvswitch-switch); it says what is missing and skips what it cannot run.
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
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

PARTS = ("compute", "io", "scaling", "tenants")


def scaling(runs: int, packets: int, say=print) -> dict:
    """The router chain of benchmarks/runtime.py inline and on 1 and 2 workers."""
    import runtime as rtbench

    chains = {name: rtbench.Chain(w, 64) for name, w in
              (("inline", 0), ("1 worker", 1), ("2 workers", 2))}
    figs: dict[str, list[float]] = {k: [] for k in chains}
    try:
        for c in chains.values():
            c.run(20 * rtbench.BATCH)
        for _ in range(runs):
            for k, c in chains.items():
                figs[k].append(c.run(packets) / 1e6)
    finally:
        for c in chains.values():
            c.close()
    out = {}
    for k, v in figs.items():
        out[k] = {"mpps": statistics.median(v), "min": min(v), "max": max(v), "runs": v,
                  "vs_inline": statistics.median(v) / statistics.median(figs["inline"])}
        say(f"  {k:10} {out[k]['mpps']:6.2f} Mpps ({min(v):.2f} - {max(v):.2f}), "
            f"{out[k]['vs_inline']:.2f}x inline")
    return {"chain": "router, 64-byte frames, batch 256, in memory", "cores": os.cpu_count(),
            "results": out}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("compute", "io") if res.get(p)]
    fig, axes = plt.subplots(len(parts) or 1, 1, figsize=(11, 4.2 * max(len(parts), 1)),
                             squeeze=False)
    for ax, part in zip(axes[:, 0], parts):
        if part == "compute":
            c = res["compute"]
            names = list(dict.fromkeys(x["scenario"] for x in c["cells"]))
            series = {}
            for x in c["cells"]:
                if x["batch"] == 256:
                    series.setdefault(f"dva, {x['flows']:,} flow(s)", {})[x["scenario"]] = \
                        x["mpps"]
            if "jit_off" in c:
                series["same code, JIT off"] = c["jit_off"]
                series["scapy"] = c["scapy"]
            w = 0.8 / len(series)
            for k, (label, vals) in enumerate(series.items()):
                xs = [i + k * w for i in range(len(names))]
                ax.bar(xs, [vals.get(n, 0) for n in names], w, label=label)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names)
            ax.set_yscale("log")
            ax.set_ylabel("Mpps, one core (log)")
            ax.set_title("In memory: 64-byte frames, batch 256")
            ax.axhline(10, color="grey", lw=0.8, ls="--")
            ax.text(len(names) - 0.5, 11, "10 Mpps", fontsize=7, color="grey", ha="right")
            ax.set_ylim(top=200)  # room for the legend above the bars
            ax.legend(fontsize=8, loc="upper center", ncol=len(series))
        else:
            med = res["io"].get("medians", {})
            names = [n for n in med if n not in res["io"].get("skipped", {})]
            dl = [med[n]["delivered_mpps"] for n in names]
            pc = [med[n]["mpps_per_core"] for n in names]
            xs = list(range(len(names)))
            for off, vals, label in ((-0.2, dl, "delivered Mpps"),
                                     (0.2, pc, "Mpps per busy core")):
                ax.bar([x + off for x in xs], [v["median"] for v in vals], 0.4, label=label,
                       yerr=[[v["median"] - v["min"] for v in vals],
                             [v["max"] - v["median"] for v in vals]], capsize=3)
            ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("Mpps")
            ax.set_title("Over veths: trafgen -> forwarder -> sink (medians, min-max)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", type=int, default=0, help="CPU the compute part is pinned to")
    ap.add_argument("--out", default=str(HERE / "results" / "suite.json"))
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "benchmarks-suite.png"))
    a = ap.parse_args()
    parts = a.parts.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        sys.exit(f"suite: unknown part(s) {', '.join(bad)}; known: {', '.join(PARTS)}")
    import numba

    res: dict = {"meta": {
        "command": "python benchmarks/suite.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.node()}",
        "kernel": platform.release(), "python": platform.python_version(),
        "numba": numba.__version__, "runs": a.runs}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if set(parts) != set(PARTS) and out.exists():
        # a part run again replaces that part of the record; the others stay
        old = json.loads(out.read_text())
        res = {**old, "meta": {**old.get("meta", {}), **{f"{p} run": res["meta"]
                                                          for p in parts}}}

    def save() -> None:
        out.write_text(json.dumps(res, indent=2) + "\n")

    runs = 2 if a.quick else a.runs
    if "compute" in parts:
        import compute

        print("compute: in-memory scenarios, one core")
        mask = os.sched_getaffinity(0)
        compute.pin(a.cpu)
        try:
            res["compute"] = compute.run_compute(
                list(compute.SCENARIOS), [1, 10_000] if a.quick else list(compute.FLOWS),
                list(compute.BATCHES), runs, 200_000 if a.quick else 1_000_000)
        finally:
            os.sched_setaffinity(0, mask)
        print(compute.table(res["compute"]))
        save()
    if "io" in parts:
        print("io: forwarders over veths")
        if os.geteuid() != 0:
            print("  skipped: needs root (network namespaces and veths)")
            res["io"] = {"skipped": "needs root"}
        else:
            import io_peers

            res["io"] = io_peers.run_suite(runs, 100_000 if a.quick else 300_000, None)
            print(io_peers.format_table(res["io"]))
        save()
    if "scaling" in parts:
        print("scaling: router chain, inline / 1 / 2 workers (in memory)")
        res["scaling"] = scaling(runs, 500_000 if a.quick else 2_000_000)
        save()
    if "tenants" in parts:
        import tenants

        print("tenants: memory and start time per appliance")
        res["tenants"] = tenants.run_counts([1, 100] if a.quick else [1, 100, 1000])
        for mode, p in res["tenants"]["per_tenant"].items():
            print(f"  {mode}: {p['start_ms_per_tenant']:.2f} ms and "
                  f"{p['kib_per_tenant']:.0f} KiB per tenant")
        save()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"written to {out}; no plot: matplotlib is missing "
              "(python -m pip install -e '.[bench]')")
        return
    plot(res, Path(a.plot))
    print(f"written to {out} and {a.plot}")


if __name__ == "__main__":
    main()
