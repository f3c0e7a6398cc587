"""One device type's ``process`` against another version of it, in one process.

    python benchmarks/ab_process.py OLD_FILE MODULE CLASS SCENARIOS [--runs 7]
                                    [--flows 1000000] [--packets 1000000] [--cpu 0]

    git show 69a972e:src/dva/nf/lb.py > /tmp/lb_old.py
    python benchmarks/ab_process.py /tmp/lb_old.py dva.nf.lb Lb services:lb_est,services:lb_reply
    python benchmarks/ab_process.py /tmp/nat_old.py dva.nf.nat Nat stateful:nat_est,stateful:fw_nat_est

    git worktree add /tmp/wt_old 7f91d14
    python benchmarks/ab_process.py /tmp/wt_old/src dva.nf.lb Lb services:lb_select

Two processes cannot resolve less than about 15% on these shared VMs: the machine's
speed moves more than that between them. This runs both versions on the same tables
and frames: the scenarios (``services:NAME`` of ``services.py``, ``stateful:STEP`` of
``stateful.py``, ``--flows`` its table size) are built once, then each run times every
scenario with the current ``CLASS.process`` of ``MODULE`` and with ``OLD_FILE``'s
(a copy of the module from another revision, loaded beside it under another name),
interleaved (each scenario run once untimed first, the versions taking turns to go
first: the first run after a change of scenario is slower, by 8% in nat_est, which
would count against one version). The old file runs against the current versions of
everything it imports: where a helper it calls was renamed since, adapt the copy. Or
give, instead of a file, another revision's ``src`` folder: its whole ``dva`` package
is loaded beside the current one under another name, so that the old ``MODULE`` runs
with the old versions of everything (a change to shared kernels, measured across
every device using them).
Prints the median, min and max Mpps of each scenario and version; nothing is written.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent


def load_copy(path: str):
    """The module in ``path`` under a name of its own, from a fresh copy of the file
    (numba caches kernels by file path: an earlier run's entries, of an older copy
    or under another module name, are never found)."""
    text = Path(path).read_bytes()
    name = "_ab_" + Path(path).stem + "_" + hashlib.sha1(text).hexdigest()[:10]
    fresh = Path(tempfile.mkdtemp(prefix="dva-ab-")) / f"{name}.py"
    fresh.write_bytes(text)
    spec = importlib.util.spec_from_file_location(name, fresh)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_tree(src: str, module: str):
    """``module`` (``dva.…``) of the ``dva`` package under ``src``, from a copy of the
    package renamed (its imports of itself too), beside the current one."""
    pkg = Path(src) / "dva"
    text = b"".join(p.read_bytes() for p in sorted(pkg.rglob("*.py")))
    name = "dva_ab_" + hashlib.sha1(text).hexdigest()[:10]
    root = Path(tempfile.mkdtemp(prefix="dva-ab-"))
    for p in pkg.rglob("*.py"):
        out = root / name / p.relative_to(pkg)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(re.sub(r"\bdva\.", name + ".", p.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(name + module.removeprefix("dva"))


def build(names: list[str], flows: int, packets: int) -> dict:
    """scenario name -> a function that runs it once and returns its Mpps."""
    out = {}
    stateful_steps = None
    for n in names:
        kind, _, what = n.partition(":")
        if kind == "stateful":
            if stateful_steps is None:
                import stateful
                stateful_steps, *_ = stateful.build(flows)
            out[n] = lambda f=stateful_steps[what]: f() / 1e6
        elif kind == "services":
            import services
            scenario = services.SCENARIOS[what]()
            out[n] = lambda s=scenario: services.timed(s, packets)
        else:
            raise SystemExit(f"scenario {n!r}: give services:NAME or stateful:STEP")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old_file")
    ap.add_argument("module")
    ap.add_argument("cls", metavar="CLASS")
    ap.add_argument("scenarios")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not)")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.path.insert(0, str(HERE))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    cls = getattr(importlib.import_module(a.module), a.cls)
    old = load_tree(a.old_file, a.module) if Path(a.old_file).is_dir() \
        else load_copy(a.old_file)
    versions = {"current": cls.process, "old": getattr(old, a.cls).process}
    scenarios = build(a.scenarios.split(","), a.flows, a.packets)
    for proc in versions.values():  # compile and warm both
        cls.process = proc
        for run in scenarios.values():
            run()
    rates = {(s, v): [] for s in scenarios for v in versions}
    order = list(versions.items())
    try:
        for k in range(a.runs):
            for s, run in scenarios.items():
                # the first run after a change of scenario finds the caches full of
                # the last one's lines: untimed, and the versions take turns first
                run()
                for v, proc in (order if k % 2 == 0 else order[::-1]):
                    cls.process = proc
                    rates[(s, v)].append(run())
    finally:
        cls.process = versions["current"]
    print(f"{'scenario':24} {'version':8} {'median':>8} {'min':>8} {'max':>8}  Mpps")
    for (s, v), r in rates.items():
        print(f"{s:24} {v:8} {statistics.median(r):8.2f} {min(r):8.2f} {max(r):8.2f}")


if __name__ == "__main__":
    main()
