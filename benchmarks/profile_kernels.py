"""Where a benchmark scenario's time goes, by compiled kernel and by instruction.

    python benchmarks/profile_kernels.py SCENARIO [--seconds 6] [--top 20]
                                         [--annotate KERNEL] [--regions 6] [--lines]

``SCENARIO`` is a scenario of ``services.py`` (``lb_est``, ``vxlan_decap``, ...) or
``stateful:STEP`` for a step of ``stateful.py`` (``stateful:fw_nat_est``; ``--flows``
sets its table size). The scenario runs in a loop on CPU 0 while ``perf record -e
cpu-clock`` samples this process (software clock events: these VMs have no hardware
counters; install ``linux-perf``). numba's JIT code has no symbols for perf, so the
script compiles every kernel afresh into an empty numba cache folder (a cached kernel
keeps no object code to read), writes the object code of each to a folder, and maps
each sample to the kernel whose code holds it. A kernel another kernel calls is
linked into the caller's code: its samples are its own line, under its own name.

``--annotate KERNEL`` prints that kernel's hottest 256-byte regions of machine code
(``objdump -d``) with the samples of each instruction. A sample lands on the
instruction *after* the one that waited: a load that missed the cache shows as the
next instruction, a prefetch that found the miss queue full as the one after it.
With ``--lines`` the kernels are compiled with debug information
(``NUMBA_DEBUGINFO=1``) and the annotation is by source line instead (``objdump
-dl``): the Python lines, of the kernel or of any function inlined into it, that
hold most of its samples (when more than one of those functions has a line of that
number, the innermost is shown and the others are named after it). Debug information changes the code generated
a little; the split between lines is what it is for, not the totals.

Needs root (or ``perf_event_paranoid`` <= 1) and ``perf`` and ``objdump`` on the
PATH. Prints only; nothing is written but the temporary folders.
"""

from __future__ import annotations

import os
import sys
import tempfile

_TMP = tempfile.mkdtemp(prefix="dva-prof-")
os.environ["NUMBA_CACHE_DIR"] = os.path.join(_TMP, "numba")  # before numba loads
if "--lines" in sys.argv:
    os.environ["NUMBA_DEBUGINFO"] = "1"

import argparse  # noqa: E402
import bisect  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def scenario_step(name: str, flows: int):
    if name.startswith("stateful:"):
        import stateful
        steps, *_ = stateful.build(flows)
        return steps[name.split(":", 1)[1]]
    import services
    sc = services.SCENARIOS[name]()
    sc.step()
    sc.check()
    return sc.step


def kernel_symbols(objdir: Path) -> list[tuple[int, int, str, str, int]]:
    """(address, size, kernel name, object file, offset in it) of every compiled
    function of every kernel loaded so far."""
    import numba
    out, seen = [], set()
    for mod in list(sys.modules.values()):
        for disp in list(vars(mod).values()) if mod is not None else ():
            if not isinstance(disp, numba.core.registry.CPUDispatcher):
                continue
            for cres in disp.overloads.values():
                lib = cres.library
                if id(lib) in seen:
                    continue
                seen.add(id(lib))
                fn = cres.fndesc.llvm_func_name
                try:
                    addr = lib.get_pointer_to_function(fn)
                    obj = lib._get_compiled_object()
                except Exception:  # noqa: BLE001 -- compiled elsewhere: no object kept
                    continue
                p = objdir / f"{disp.py_func.__name__}_{len(seen)}.o"
                p.write_bytes(obj)
                table = {}
                for ln in subprocess.run(["objdump", "-t", str(p)], capture_output=True,
                                         text=True).stdout.splitlines():
                    f = ln.split()
                    if len(f) >= 6 and "text" in f[-3]:
                        table[f[-1]] = (int(f[0], 16), int(f[-2], 16))
                if fn not in table:
                    continue
                base = addr - table[fn][0]
                for sym, (off, size) in table.items():
                    if size and not sym.startswith(("_ZN7cpython", "cfunc.")):
                        out.append((base + off, size, _demangle(sym), str(p), off))
    out.sort()
    return out


def _demangle(sym: str) -> str:
    """``_ZN3dva2nf2lb9lb_kernelB4v315...`` -> ``dva.nf.lb.lb_kernel``."""
    if not sym.startswith("_ZN"):
        return sym[:60]
    parts, i = [], 3
    while i < len(sym) and sym[i].isdigit():
        j = i
        while sym[j].isdigit():
            j += 1
        n = int(sym[i:j])
        parts.append(sym[j:j + n])
        i = j + n
    return ".".join(parts) or sym[:60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--flows", type=int, default=1_000_000, help="stateful: flows")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--annotate", default="", help="a kernel name (its last part)")
    ap.add_argument("--regions", type=int, default=6)
    ap.add_argument("--lines", action="store_true",
                    help="annotate by source line (kernels built with debug info)")
    a = ap.parse_args()
    for tool in ("perf", "objdump"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed")
    os.sched_setaffinity(0, {0})
    try:
        step = scenario_step(a.scenario, a.flows)
        step()
        objdir = Path(_TMP) / "obj"
        objdir.mkdir()
        syms = kernel_symbols(objdir)
        data = Path(_TMP) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "10000", "-p",
                                 str(os.getpid()), "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.time()
        while time.time() - t0 < a.seconds:
            step()
        perf.send_signal(signal.SIGINT)
        perf.wait()
        ips, dsos = [], []
        for ln in subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,dso"],
                                 capture_output=True, text=True).stdout.splitlines():
            f = ln.split()
            if f:
                ips.append(int(f[0], 16))
                dsos.append(f[-1].strip("()").rsplit("/", 1)[-1])
        starts = [s[0] for s in syms]
        by_kernel: Counter[str] = Counter()
        by_ins: Counter[tuple[int, int]] = Counter()
        for ip, dso in zip(ips, dsos):
            j = bisect.bisect_right(starts, ip) - 1
            if j >= 0 and ip < syms[j][0] + syms[j][1]:
                by_kernel[syms[j][2]] += 1
                by_ins[(j, ip - syms[j][0] + syms[j][4])] += 1
            elif dso.startswith("perf-"):  # JIT code of no module-level kernel
                by_kernel["(a kernel defined inside a function: the benchmark's)"] += 1
            else:
                by_kernel[f"(not a kernel: {dso})"] += 1
        total = max(1, len(ips))
        print(f"{a.scenario}: {len(ips)} samples over {a.seconds:.0f} s")
        for name, c in by_kernel.most_common(a.top):
            print(f"{100 * c / total:6.1f}%  {name}")
        if a.annotate:
            _annotate(a.annotate, syms, by_ins, total, a.regions, a.lines, a.top)
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)


def _annotate(want, syms, by_ins, total, regions, lines=False, top=20) -> None:
    own_of: dict[int, dict[int, int]] = {}
    for (j, off), c in by_ins.items():
        if syms[j][2].split(".")[-1] == want:
            own_of.setdefault(j, {})[off] = c
    if not own_of:
        print(f"no kernel named {want!r} was sampled")
        return
    # the copy (each caller links its own) with the most samples
    j = max(own_of, key=lambda k: sum(own_of[k].values()))
    own = own_of[j]
    _, size, name, path, base = syms[j]
    n = sum(own.values())
    print(f"\n{name}: {n} samples ({100 * n / total:.1f}%), its hottest regions")
    dis = subprocess.run(["objdump", "-d" + ("l" if lines else ""), "--no-show-raw-insn",
                          "-M", "intel", f"--start-address={base}",
                          f"--stop-address={base + size}", path],
                         capture_output=True, text=True).stdout
    if lines:
        _by_line(dis, own, n, top, name)
        return
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s*([0-9a-f]+):\s+(.*)", ln) for ln in dis.splitlines()) if m]
    reg: Counter[int] = Counter()
    for off, _ in ins:
        reg[(off - base) // 256] += own.get(off, 0)
    for r, c in reg.most_common(regions):
        print(f"--- +{r * 256:#x}: {100 * c / max(n, 1):.1f}% of the kernel")
        for off, text in ins:
            if r * 256 <= off - base < (r + 1) * 256:
                print(f"{own.get(off, 0):7d} {off - base:6x}  {text[:100]}")


def _reachable(name: str) -> list[tuple[str, int, int, str]]:
    """(file, first line, last line, qualified name) of kernel ``name``
    (``dva.nf.nat.nat_kernel``) and of every jitted function it calls, recursively."""
    import inspect

    import numba
    modname, _, fname = name.rpartition(".")
    root = getattr(sys.modules.get(modname), fname, None)
    out, todo, seen = [], [root], set()
    while todo:
        d = todo.pop()
        fn = getattr(d, "py_func", None)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        try:
            lines, first = inspect.getsourcelines(fn)
        except (OSError, TypeError):
            continue
        out.append((fn.__code__.co_filename, first, first + len(lines) - 1,
                    f"{fn.__module__}.{fn.__name__}"))
        for ref in fn.__code__.co_names:
            g = fn.__globals__.get(ref)
            if isinstance(g, numba.core.registry.CPUDispatcher):
                todo.append(g)
    return out


def _by_line(dis: str, own: dict[int, int], n: int, top: int, name: str) -> None:
    """Samples per source line, from ``objdump -dl`` (a ``file:line`` line precedes
    the instructions generated for it). numba's debug information names an inlined
    function's lines by their numbers in its own module but under the caller's file
    name; each line is therefore shown as the innermost of the kernel's callees
    (recursively) whose source holds that number, the kernel's own first."""
    at = ("?", 0)
    per: Counter[tuple[str, int]] = Counter()
    for ln in dis.splitlines():
        m = re.match(r"^(/\S+\.py):(\d+)", ln)
        if m:
            at = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*([0-9a-f]+):\s", ln)
        if m:
            per[at] += own.get(int(m.group(1), 16), 0)
    funcs = _reachable(name)
    for (path, no), c in per.most_common(top):
        hold = [f for f in funcs if f[1] <= no <= f[2]]
        mine = [f for f in hold if f[0] == path and f[3] == name]
        best = mine[0] if mine else min(hold, key=lambda f: f[2] - f[1], default=None)
        text, where, alt = "", f"{Path(path).name}:{no}", ""
        if best is not None:
            where = f"{best[3]}:{no}"
            try:
                text = Path(best[0]).read_text().splitlines()[no - 1].strip()
            except (OSError, IndexError):
                pass
            if not mine and len(hold) > 1:
                alt = "  (or " + ", ".join(sorted({f[3].rpartition(".")[2] for f in hold
                                                   if f is not best})) + ")"
        print(f"{100 * c / max(n, 1):5.1f}%  {where}  {text[:60]}{alt}")

if __name__ == "__main__":
    main()
