"""``dva demo``: a live appliance between real Linux hosts, verified, then removed.

The lab: two LAN hosts (h1, h2, h2 with a web server) and an "internet" host (inet)
with an HTTP server, each a network namespace with a veth to the root namespace.
The appliance -- a switch for the LAN, a router, a stateful firewall and a NAT
(masquerade behind the router's WAN address, a port forward to h2) -- runs as a
separate ``dva run`` process attached to those veths with af_packet. The demo then
checks real traffic: ARP and ping inside the LAN, ping of the router, ping and curl
across it (with the TTL one less), that the internet host sees the NAT address,
traceroute showing the router hop, "Destination Net Unreachable" for an address
without a route, the port forward reaching h2 from the internet, and the firewall
keeping everything else out. It stops the appliance (SIGINT), prints its final
counters, and removes every namespace and link, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dva.tools.lab import Lab

READY_TIMEOUT = 180  # seconds for dva run to open its ports and compile its kernels

APPLIANCE = """\
appliance: demo
tenant: lab
devices:
  lan:
    type: switch
    ports: [h1, h2, gw]
  r1:
    type: router
    ports:
      lan: {{ip: 10.0.0.1/24}}
      wan: {{ip: 198.51.100.1/24}}
  fw:
    type: firewall
    ports: [inside, outside]
    default: deny               # stateful: replies of allowed connections pass
    rules:
      - {{action: allow, from: inside}}
      - {{action: allow, from: outside, proto: tcp, dst: 10.0.0.12, dport: 8000}}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: 198.51.100.1}}   # masquerade behind the router's WAN address
    dnat:
      - {{proto: tcp, dport: 8080, to: "10.0.0.12:8000"}}
links:
  - [lan.gw, r1.lan]
  - [r1.wan, fw.inside]
  - [fw.outside, nat.inside]
attach:
  lan.h1: {{af_packet: {h1}}}
  lan.h2: {{af_packet: {h2}}}
  nat.outside: {{af_packet: {inet}}}
"""


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class DemoResult:
    checks: list[Check] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    appliance_exit: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks) and \
            self.appliance_exit == 0


def start_appliance(path: Path, workdir: Path, extra: list[str] | tuple = ()
                    ) -> tuple[subprocess.Popen, Path]:
    ready = workdir / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "dva.cli", "run", str(path), "--json",
                             "--ready-file", str(ready), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # The first run after any source change compiles every kernel (the router's alone
    # takes ~35 s on these machines); later runs load them from the cache.
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the appliance did not start: {proc.stderr.read().strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the appliance did not get ready within {READY_TIMEOUT} s")
        time.sleep(0.1)
    return proc, ready


def stop_appliance(proc: subprocess.Popen) -> tuple[int, dict[str, int], str]:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    try:
        counters = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        counters = {}
    return proc.returncode, counters, stderr


def run_demo(say=print, workers: int | None = None) -> DemoResult:
    """The demo lab; ``workers``: the appliance's worker processes (0: inline in one
    process; None: ``dva run``'s default, one per core left after the dispatcher)."""
    from dva.dispatch.runtime import default_workers

    if workers is None:
        workers = default_workers()
    res = DemoResult()
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="dva-demo-") as tmp:
        workdir = Path(tmp)
        say("building the lab: namespaces h1, h2 (10.0.0.0/24) and inet (198.51.100.0/24)")
        h1 = lab.host("h1", "10.0.0.11/24", "10.0.0.1")
        h2 = lab.host("h2", "10.0.0.12/24", "10.0.0.1")
        inet = lab.host("inet", "198.51.100.10/24", "198.51.100.1")
        (workdir / "www").mkdir()
        (workdir / "www" / "index.html").write_text("hello from the internet host\n")
        lab.http_server(inet, 8080, str(workdir / "www"))
        (workdir / "h2www").mkdir()
        (workdir / "h2www" / "index.html").write_text("hello from h2 behind the NAT\n")
        lab.http_server(h2, 8000, str(workdir / "h2www"))
        app = workdir / "demo.yaml"
        app.write_text(APPLIANCE.format(h1=h1.outside, h2=h2.outside, inet=inet.outside))
        say(f"appliance: switch lan (h1, h2) + router r1 (10.0.0.1, 198.51.100.1) + "
            f"firewall fw + nat (masquerade, port 8080 -> h2:8000) on "
            f"{h1.outside}, {h2.outside}, {inet.outside}")
        extra = ["--workers", str(workers)]
        if workers:
            extra += ["--control", str(workdir / "ctl.sock")]
            say(f"runtime: a dispatcher and {workers} worker process"
                f"{'es' if workers > 1 else ''} (shared-memory rings)")
        else:
            say("runtime: the graph inline in one process (--workers 0)")
        proc, _ = start_appliance(app, workdir, extra)
        try:
            def check(what: str, ok: bool, detail: str = "") -> None:
                res.checks.append(Check(what, ok, detail))
                say(f"  [{'ok' if ok else 'FAILED'}] {what}" + (f": {detail}" if detail else ""))

            p = lab.exec(h1, ["ping", "-c", "3", "-i", "0.2", "-W", "2", h2.addr], check=False)
            check("h1 pings h2 through the switch (ARP + ICMP)", p.returncode == 0,
                  _summary(p.stdout))
            neigh = lab.exec(h1, ["ip", "neigh", "show", h2.addr], check=False).stdout
            check("h1 learned h2's MAC by ARP", h2.mac in neigh, neigh.strip())
            p = lab.exec(h1, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.0.1"],
                         check=False)
            check("h1 pings the router's LAN address", p.returncode == 0, _summary(p.stdout))
            cap = lab.popen(inet, ["tcpdump", "-n", "-l", "-v", "-c", "3", "-i", "eth0",
                                   "icmp[icmptype] == 8"], text=True)
            time.sleep(1.0)  # tcpdump attaches
            p = lab.exec(h1, ["ping", "-c", "3", "-i", "0.2", "-W", "2", inet.addr],
                         check=False)
            ttl = re.findall(r"ttl=(\d+)", p.stdout)
            check("h1 pings inet across the router; the reply arrives with TTL 63",
                  p.returncode == 0 and bool(ttl) and all(t == "63" for t in ttl),
                  f"ttl={','.join(ttl)}")
            try:
                seen, _ = cap.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                cap.kill()
                seen, _ = cap.communicate()
            seen_ttl = re.findall(r"ttl (\d+)", seen)
            check("inet receives h1's echo requests with TTL 63 (64 - 1 hop)",
                  len(seen_ttl) == 3 and all(t == "63" for t in seen_ttl),
                  f"ttl={','.join(seen_ttl)}")
            syns = lab.popen(inet, ["tcpdump", "-n", "-l", "-c", "1", "-i", "eth0",
                                    "tcp dst port 8080 and tcp[tcpflags] & tcp-syn != 0"],
                             text=True)
            time.sleep(1.0)
            p = lab.exec(h1, ["curl", "-sS", "--max-time", "10",
                              f"http://{inet.addr}:8080/index.html"], check=False)
            check("h1 fetches a page from inet with curl through router, firewall and NAT",
                  p.returncode == 0 and "hello from the internet host" in p.stdout,
                  p.stdout.strip() or p.stderr.strip())
            try:
                seen, _ = syns.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                syns.kill()
                seen, _ = syns.communicate()
            src = re.findall(r"IP (\d+\.\d+\.\d+\.\d+)\.\d+ >", seen)
            check("inet sees the connection come from the NAT address 198.51.100.1",
                  src == ["198.51.100.1"], ",".join(src) or seen.strip())
            p = lab.exec(h1, ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "4", inet.addr],
                         check=False)
            hops = [ln.split() for ln in p.stdout.splitlines()[1:] if ln.strip()]
            check("traceroute shows the router as the first hop",
                  len(hops) >= 2 and hops[0][1] == "10.0.0.1" and hops[-1][1] == inet.addr,
                  " | ".join(" ".join(h[:2]) for h in hops))
            p = lab.exec(h1, ["ping", "-c", "1", "-W", "2", "203.0.113.9"], check=False)
            check("a ping to an unrouted address gets Destination Net Unreachable",
                  "Destination Net Unreachable" in p.stdout, _summary(p.stdout))
            srv = lab.popen(inet, ["iperf3", "-s", "-1", "-p", "5201"], text=True)
            time.sleep(0.5)
            p = lab.exec(h1, ["iperf3", "-c", inet.addr, "-p", "5201", "-t", "2", "-J"],
                         check=False, timeout=30)
            srv.kill()
            srv.communicate()
            rate = _iperf_rate(p.stdout)
            check("an iperf3 TCP transfer from h1 to inet through router, firewall and NAT",
                  p.returncode == 0 and rate > 0, f"{rate / 1e6:.0f} Mbit/s")
            p = lab.exec(inet, ["curl", "-sS", "--max-time", "10",
                                "http://198.51.100.1:8080/index.html"], check=False)
            check("inet reaches h2's web server through the NAT's port forward 8080",
                  p.returncode == 0 and "hello from h2 behind the NAT" in p.stdout,
                  p.stdout.strip() or p.stderr.strip())
            p = lab.exec(inet, ["ping", "-c", "2", "-i", "0.2", "-W", "1", h1.addr],
                         check=False)
            check("the firewall keeps inet's pings to h1 out (default deny)",
                  p.returncode != 0 and " 0 received" in p.stdout, _summary(p.stdout))
            p = lab.exec(inet, ["curl", "-sS", "--max-time", "3",
                                f"http://{h2.addr}:8001/"], check=False)
            check("and a connection to a port no rule allows", p.returncode != 0,
                  p.stderr.strip())
        finally:
            code, counters, stderr = stop_appliance(proc)
            res.appliance_exit = code
            res.counters = counters
            if code != 0:
                say(f"the appliance exited with {code}: {stderr.strip()}")
    return res


def _iperf_rate(out: str) -> float:
    """Bits per second received, from iperf3 -J output (0 when there is none)."""
    try:
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError):
        return 0.0


def _summary(text: str) -> str:
    for ln in text.splitlines():
        if "packets transmitted" in ln or "Unreachable" in ln:
            return ln.strip()
    return text.strip().splitlines()[-1] if text.strip() else ""
