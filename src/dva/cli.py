"""The ``dva`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from dva.graph.appliance import ApplianceError, load_appliance

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _load(path: str):
    try:
        return load_appliance(path)
    except ApplianceError as e:
        err.print(e.render(), markup=False)
        sys.exit(1)


@click.group()
@click.version_option(package_name="dva")
def main() -> None:
    """dva: distributed virtual network appliances."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check appliance FILES; print every problem with its file, line and path."""
    bad = 0
    for f in files:
        try:
            app = load_appliance(f)
        except ApplianceError as e:
            err.print(e.render(), markup=False)
            bad += 1
            continue
        out.print(f"{f}: ok: appliance {app.qualified_name}, {len(app.devices)} devices, "
                  f"{len(app.links)} links, {len(app.attachments)} attachments",
                  markup=False)
        for w in app.warnings:
            out.print(f"{f}: warning: {w}", markup=False)
        for note in _fusion_notes(app):
            out.print(f"{f}: note: {note}", markup=False)
    sys.exit(1 if bad else 0)


def _fusion_notes(app) -> list[str]:
    """How firewalls linked to a NAT's inside run (dva.worker.fused)."""
    from dva.graph.plan import compile_plan
    from dva.worker.fused import find_pairs
    plan = compile_plan(app)
    pairs, why = find_pairs(plan)
    notes = [f"{p.fw_dev.name} and {p.nat_dev.name} run fused: one connection table"
             for p in pairs]
    return notes + [f"not fused: {w}" for w in why]


def counters_table(title: str, counters: dict[str, int], show_all: bool) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("object")
    t.add_column("counter")
    t.add_column("packets", justify="right")
    for name, v in counters.items():
        if v or show_all:
            obj, _, ctr = name.rpartition(" ")
            t.add_row(obj, ctr, str(v))
    return t


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1, 65536))
@click.option("--hop-limit", default=16, show_default=True, type=click.IntRange(1, 255))
@click.option("--all", "show_all", is_flag=True, help="Show counters that stayed 0.")
@click.option("--json", "as_json", is_flag=True, help="Print (final) counters as JSON.")
@click.option("--quiet", is_flag=True, help="No live view, no counter table; errors only.")
@click.option("--duration", type=click.FloatRange(min=0), default=None,
              help="Live: stop after this many seconds.")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Live: create this file once every port is open and traffic flows.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where devices keep state across restarts (DHCP leases), as "
                   "DIR/TENANT/APPLIANCE/DEVICE.state. Live default: $DVA_STATE_DIR, "
                   "else /var/lib/dva; offline runs keep state only with this option.")
@click.option("--workers", default=None, type=click.IntRange(0, 64),
              help="Data-plane worker processes fed by a dispatcher over shared memory; "
                   "0 runs the graph inline in this process. Default: live, one per core "
                   "left after the dispatcher; offline (pcap/memory), 0.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None,
              help="With --workers: the control socket for dva status/counters/apply/stop "
                   "(default $DVA_RUN_DIR, else /run/dva, /TENANT-APPLIANCE.sock).")
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="Live: let the manager run MIN to MAX workers, following their load.")
@click.option("--scale-policy", default="", metavar="K=V,...",
              help="Autoscaler thresholds: out (mean busy fraction to add a worker, "
                   "0.75), in (to remove one, 0.25), ring (rx ring fill, 0.5), sustain "
                   "(s, 3), hold (s between decisions, 10).")
def run(file: str, batch_size: int, hop_limit: int, show_all: bool, as_json: bool,
        quiet: bool, duration: float | None, ready_file: str | None,
        state_dir: str | None, workers: int | None, control_path: str | None,
        autoscale: str | None, scale_policy: str) -> None:
    """Run the appliance in FILE.

    With pcap/memory attachments: offline, over the pcap inputs, then print counters.
    With af_packet/tap attachments: live, until SIGINT/SIGTERM (or --duration), with a
    live view of rates and drops, then print the final counters. Live, SIGHUP reloads
    FILE: a valid file becomes the next config generation (connections and counters
    kept); an invalid one, or one with other attachments, is rejected and the running
    generation stays. Devices that keep state (DHCP leases) load it at start and save it
    after changes and at the end (see --state-dir).
    """
    import os

    from dva.dispatch.live import LIVE_KINDS
    from dva.dispatch.runtime import default_workers
    from dva.worker.persist import DEFAULT_DIR

    app = _load(file)
    live = any(a.spec.kind in LIVE_KINDS for a in app.attachments)
    if live:
        state_dir = state_dir or os.environ.get("DVA_STATE_DIR") or DEFAULT_DIR
    policy = None
    if autoscale is not None:
        policy = _policy(autoscale, scale_policy)
        if workers is None:
            workers = policy.min_workers
        elif not policy.min_workers <= workers <= policy.max_workers:
            err.print(f"error: --workers {workers} is outside --autoscale {autoscale}",
                      markup=False)
            sys.exit(2)
    if workers is None:
        workers = default_workers() if live else 0
    if workers:
        _run_runtime(app, live, workers, batch_size, hop_limit, show_all, as_json, quiet,
                     duration, ready_file, control_path, state_dir, policy)
    elif live:
        _run_live(app, batch_size, hop_limit, show_all, as_json, quiet, duration, ready_file,
                  state_dir)
    else:
        _run_offline(app, batch_size, hop_limit, show_all, as_json, quiet, state_dir)


def _policy(spec: str, extra: str):
    from dva.dispatch.autoscale import Policy

    names = {"out": "out_busy", "in": "in_busy", "ring": "ring_high", "sustain": "sustain",
             "hold": "hold_down"}
    try:
        lo, _, hi = spec.partition(":")
        kw = {"min_workers": int(lo), "max_workers": int(hi)}
        for item in filter(None, extra.split(",")):
            k, _, v = item.partition("=")
            if k.strip() not in names:
                raise ValueError(f"unknown policy key {k.strip()!r} (keys: "
                                 f"{', '.join(names)})")
            kw[names[k.strip()]] = float(v)
        return Policy(**kw)
    except ValueError as e:
        err.print(f"error: --autoscale {spec} --scale-policy {extra!r}: {e}", markup=False)
        sys.exit(2)


def _run_offline(app, batch_size, hop_limit, show_all, as_json, quiet, state_dir) -> None:
    from dva.dispatch.offline import OfflineRunner
    from dva.ports.offline import PortError

    try:
        with OfflineRunner(app, batch_size=batch_size, hop_limit=hop_limit,
                           state_dir=state_dir,
                           say=lambda line: err.print(line, markup=False)) as r:
            res = r.run()
    except PortError as e:
        err.print(f"error: {e}", markup=False)
        sys.exit(1)
    if as_json:
        out.print_json(json.dumps(res.counters))
    elif not quiet:
        out.print(counters_table(f"{app.qualified_name}: {res.batches} batches",
                                 res.counters, show_all))
    for e in res.accounting_errors:
        err.print(f"accounting error: {e}", markup=False)
    sys.exit(1 if res.accounting_errors else 0)


def _run_live(app, batch_size, hop_limit, show_all, as_json, quiet, duration,
              ready_file, state_dir) -> None:
    import signal

    from dva.dispatch.live import LiveRunner
    from dva.ports.offline import PortError

    try:
        runner = LiveRunner(app, batch_size=batch_size, hop_limit=hop_limit,
                            say=lambda line: err.print(line, markup=False),
                            state_dir=state_dir)
    except PortError as e:
        err.print(f"error: {e}", markup=False)
        sys.exit(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop())
    signal.signal(signal.SIGHUP, lambda *_: runner.request_reload())
    failure = None
    with runner:
        if ready_file:
            Path(ready_file).touch()
        try:
            if quiet or as_json:
                runner.run(duration)
            else:
                _live_view(runner, duration)
        except PortError as e:
            failure = str(e)
        counters = runner.counters()
        errs = runner.engine.accounting_errors()
    if as_json:
        out.print_json(json.dumps(counters))
    elif not quiet:
        elapsed = time.monotonic() - runner.started
        out.print(counters_table(f"{runner.app.qualified_name}: stopped after "
                                 f"{elapsed:.1f} s, config generation {runner.generation}",
                                 counters, show_all))
    if failure:
        err.print(f"error: {failure}", markup=False)
    for e in errs:
        err.print(f"accounting error: {e}", markup=False)
    sys.exit(1 if failure or errs else 0)


def _run_runtime(app, live, workers, batch_size, hop_limit, show_all, as_json, quiet,
                 duration, ready_file, control_path, state_dir, policy=None) -> None:
    """``dva run --workers N``: the dispatcher (this process), N workers, a manager."""
    import signal

    from dva.control.sock import ControlServer, default_path
    from dva.dispatch.runtime import Runtime
    from dva.ports.offline import PortError

    def say(line: str) -> None:
        err.print(line, markup=False)

    try:
        rt = Runtime([app], workers=workers, live=live, batch_size=batch_size,
                     hop_limit=hop_limit, say=say, state_dir=state_dir, autoscale=policy,
                     max_workers=policy.max_workers if policy else None)
    except (PortError, ValueError) as e:
        err.print(f"error: {e}", markup=False)
        sys.exit(1)
    control = None
    failure = None
    with rt:
        if not live:
            counters = rt.run_offline()
        else:
            path = control_path or default_path(app.tenant, app.name)
            try:
                control = ControlServer(path)
            except OSError as e:
                if control_path:
                    err.print(f"error: control socket: {e}", markup=False)
                    sys.exit(1)
                say(f"no control socket ({e}): dva status/counters/apply/stop cannot "
                    f"reach this instance (signals still work)")
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: rt.request_stop())
            signal.signal(signal.SIGHUP, lambda *_: rt.request_reload())
            try:
                try:
                    rt.wait_ready()
                except (RuntimeError, TimeoutError) as e:
                    raise PortError(str(e)) from None
                if ready_file:
                    Path(ready_file).touch()
                if quiet or as_json:
                    rt.run_live(duration, control=control)
                else:
                    _live_view(rt, duration, control=control)
            except PortError as e:
                failure = str(e)
            finally:
                if control is not None:
                    control.close()
            counters = rt.stop()
        errs = rt.final_errors
    if as_json:
        out.print_json(json.dumps(counters))
    elif not quiet:
        out.print(counters_table(f"{app.qualified_name}: {workers} workers, config "
                                 f"generation {rt.generation}", counters, show_all))
    if failure:
        err.print(f"error: {failure}", markup=False)
    for e in errs:
        err.print(f"accounting error: {e}", markup=False)
    sys.exit(1 if failure or errs else 0)


def _control_request(target: str, msg: dict) -> dict:
    """Send ``msg`` to the instance named by ``target`` (a socket path, or an
    appliance file whose tenant and name give the default path)."""
    from dva.control.sock import default_path, request

    path = target
    if not target.endswith(".sock") and Path(target).is_file():
        app = _load(target)
        path = default_path(app.tenant, app.name)
    try:
        return request(path, msg)
    except (OSError, ValueError) as e:
        err.print(f"error: no running instance answers on {path}: {e}", markup=False)
        sys.exit(1)


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
def status(target: str, as_json: bool) -> None:
    """Units of a running instance (TARGET: its control socket or appliance file),
    their load, the config generation and the manager's recent decisions."""
    r = _control_request(target, {"op": "status"})
    if not r.get("ok"):
        err.print(f"error: {r.get('error')}", markup=False)
        sys.exit(1)
    st = r["status"]
    if as_json:
        out.print_json(json.dumps(st))
        return
    t = Table(title=f"{', '.join(st['appliances'])}: generation {st['generation']}, "
                    f"{st['workers']} workers, up {st['uptime_s']} s", title_justify="left")
    for col in ("unit", "pid", "alive", "buckets", "busy", "packets", "ring", "restarts"):
        t.add_column(col, justify="left" if col == "unit" else "right")
    d = st["dispatcher"]
    t.add_row("dispatcher", str(d["pid"]), "yes", "", "", "", "", "")
    for u in st["units"]:
        t.add_row(u["unit"], str(u["pid"]), "yes" if u["alive"] else "NO", str(u["buckets"]),
                  f"{100 * u['busy_fraction']:.1f}%", f"{u['packets']:,}", str(u["ring"]),
                  str(u["restarts"]))
    out.print(t)
    for line in st["decisions"]:
        out.print(f"  {line}", markup=False)


@main.command()
@click.argument("target")
@click.option("--all", "show_all", is_flag=True, help="Show counters that stayed 0.")
@click.option("--json", "as_json", is_flag=True)
def counters(target: str, show_all: bool, as_json: bool) -> None:
    """Counters of a running instance, summed over its workers."""
    r = _control_request(target, {"op": "counters"})
    if not r.get("ok"):
        err.print(f"error: {r.get('error')}", markup=False)
        sys.exit(1)
    if as_json:
        out.print_json(json.dumps(r["counters"]))
    else:
        out.print(counters_table(f"generation {r['generation']}", r["counters"], show_all))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--control", "control_path", default=None, help="The instance's socket.")
def apply(file: str, control_path: str | None) -> None:
    """Make FILE the next config generation of the running instance (validated whole
    first; an invalid file is rejected and the running generation stays)."""
    app = _load(file)
    r = _control_request(control_path or file, {"op": "apply",
                                                "file": str(Path(file).resolve())})
    if not r.get("ok"):
        err.print(r.get("error", "rejected"), markup=False)
        sys.exit(1)
    out.print(f"{app.qualified_name}: {r['message']}", markup=False)


@main.command()
@click.argument("target")
@click.option("--workers", "n", required=True, type=click.IntRange(1, 64),
              help="The number of worker processes to run.")
def scale(target: str, n: int) -> None:
    """Start or stop workers of a running instance; buckets (and their flow state)
    move without loss so that each worker owns an even share."""
    r = _control_request(target, {"op": "scale", "workers": n})
    if not r.get("ok"):
        err.print(f"error: {r.get('error')}", markup=False)
        sys.exit(1)
    moved = sum(m["buckets"] for m in r["moves"])
    flows = sum(m["flows"] for m in r["moves"])
    slowest = max((m["ms"] for m in r["moves"]), default=0.0)
    out.print(f"{r['workers']} workers; {moved} buckets moved in {len(r['moves'])} moves "
              f"({flows} flow entries, longest hold {slowest:.1f} ms)", markup=False)


@main.command()
@click.argument("target")
def stop(target: str) -> None:
    """Stop a running instance (workers drain, final counters printed by it)."""
    r = _control_request(target, {"op": "stop"})
    if not r.get("ok"):
        err.print(f"error: {r.get('error')}", markup=False)
        sys.exit(1)
    out.print("stopping", markup=False)


def _live_view(runner, duration, control=None) -> None:
    """Rates per port and drops per reason (and, with workers, each worker's load),
    refreshed every second. ``runner``: a LiveRunner or a Runtime."""
    from rich.live import Live

    units = getattr(runner, "status", None)

    last = {"t": time.monotonic(), "c": runner.counters()}

    def table():
        now = time.monotonic()
        c = runner.counters()
        dt = max(now - last["t"], 1e-9)
        t = Table(title=f"{runner.app.qualified_name}: live, config generation "
                        f"{runner.generation} (Ctrl-C stops, SIGHUP reloads)",
                  title_justify="left")
        for col in ("port", "rx pps", "tx pps", "rx total", "tx total"):
            t.add_column(col, justify="left" if col == "port" else "right")
        for att in runner.plan.attachments:
            rx, tx = c[f"port {att.ref} rx"], c[f"port {att.ref} tx"]
            drx = (rx - last["c"].get(f"port {att.ref} rx", 0)) / dt
            dtx = (tx - last["c"].get(f"port {att.ref} tx", 0)) / dt
            t.add_row(att.ref, f"{drx:,.0f}", f"{dtx:,.0f}", f"{rx:,}", f"{tx:,}")
        drops = {k: v for k, v in c.items() if "drop/" in k and v}
        for k, v in drops.items():
            t.add_row(f"[red]{k}[/]", "", "", f"{v:,}", "")
        if units is not None:
            for u in units()["units"]:
                t.add_row(f"{u['unit']} (pid {u['pid']})",
                          f"busy {100 * u['busy_fraction']:.0f}%", f"ring {u['ring']}",
                          f"{u['packets']:,} pkts", f"{u['restarts']} restarts")
        last["t"], last["c"] = now, c
        return t

    with Live(table(), console=out, refresh_per_second=2, transient=False) as live:
        def every(_r):
            live.update(table())
        if units is None:
            runner.run(duration, every_second=every)
        else:
            runner.run_live(duration, every_second=every, control=control)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--in", "inport", required=True, metavar="DEVICE.PORT",
              help="Where the packet enters.")
@click.option("--packet", "packets", required=True, multiple=True, metavar="SPEC",
              help="Hex frame or eth(..)/ipv4(..)/udp(..); repeat to trace several in order.")
@click.option("--time", "now", default=0.0, show_default=True, type=float,
              help="Device time (seconds) of the first packet; later ones +1 s each.")
def trace(file: str, inport: str, packets: tuple[str, ...], now: float) -> None:
    """Show, device by device, what happens to a packet and why."""
    from dva.dispatch.offline import OfflineRunner
    from dva.packet.spec import SpecError, parse_spec
    from dva.worker.trace import Tracer

    app = _load(file)
    dev, _, port = inport.partition(".")
    d = app.devices.get(dev)
    if d is None or port not in d.port_index:
        err.print(f"error: --in {inport}: no such device port; ports: " + ", ".join(
            f"{n}.{p}" for n, x in app.devices.items() for p in x.ports), markup=False)
        sys.exit(2)
    frames = []
    for s in packets:
        try:
            frames.append(parse_spec(s))
        except SpecError as e:
            err.print(f"error: --packet {s!r}: {e}", markup=False)
            sys.exit(2)
    # device by device: a firewall and NAT that would run fused run apart here
    with OfflineRunner(app, open_files=False, fuse=False) as r:
        tr = Tracer(r.plan)
        r.engine.tracer = tr
        di = r.plan.device_index(dev)
        for k, f in enumerate(frames):
            out.print(f"[bold]packet {k + 1}[/] at t={now + k:g} into {inport}: "
                      f"{_describe(f)}")
            r.batch.clear()
            r.batch.add_frame(f)
            tr.start()
            outs = r.engine.inject(di, d.port_index[port], r.batch, now + k)
            for line in tr.lines(outs):
                out.print("  " + line, markup=False)
            for o in outs:
                o.release_all()
        errs = r.engine.accounting_errors()
    for e in errs:
        err.print(f"accounting error: {e}", markup=False)
    sys.exit(1 if errs else 0)


@main.command()
@click.option("--workers", default=None, type=click.IntRange(0, 8),
              help="Run the appliance with this many worker processes (0: inline; "
                   "default: one per core left after the dispatcher).")
def demo(workers: int | None) -> None:
    """Build a lab of Linux hosts in namespaces, run a live appliance between them,
    check real traffic, then remove everything (needs root)."""
    from dva.tools.demo import run_demo
    from dva.tools.lab import Lab

    why = Lab.check_environment()
    if why:
        err.print(f"error: the demo {why}", markup=False)
        sys.exit(1)
    try:
        res = run_demo(say=lambda s: out.print(s, markup=False), workers=workers)
    except KeyboardInterrupt:
        err.print("interrupted: the lab was removed", markup=False)
        sys.exit(130)
    except Exception as e:  # a failed lab step: say what, no traceback
        err.print(f"error: {e}", markup=False)
        sys.exit(1)
    if res.counters:
        out.print(counters_table("appliance counters at the end", res.counters, False))
    passed = sum(c.ok for c in res.checks)
    out.print(f"{passed} of {len(res.checks)} checks passed; the lab was removed")
    sys.exit(0 if res.ok else 1)


def _describe(frame: bytes) -> str:
    from dva.packet.spec import describe
    return describe(frame)


if __name__ == "__main__":
    main()
