"""Forwarding between two veths, frames per second and per busy core: dva vs its peers.

    python benchmarks/io_peers.py [--runs 5] [--frames 300000]
                                  [--only "dva router,kernel,ovs"] [--out FILE]

Lab: host src (10.1.0.2/24) and host dst (10.2.0.2/24), each a network namespace whose
veth peer is one port of the forwarder. These forwarders take turns on the same layout,
round-robin (every run visits each once, starting one further along each time):

* ``dva router``: ``dva run --workers 0`` (one process, the graph inline) with a router,
  af_packet on both veth ends, pinned to CPU 1;
* ``dva router+fw+nat``: the same with router -> firewall (allow what the src side
  opens, replies and RELATED pass, default deny) -> nat (masquerade of 10.1.0.0/24
  behind the router's dst-side address 10.2.0.1);
* ``kernel``: the veth ends in a namespace with the addresses and ip_forward=1;
* ``kernel+nft``: plus nftables there: a forward chain (``ct state established,related
  accept``, ``ct state new iifname <src side> accept``, policy drop) and a nat
  postrouting chain (``oifname <dst side> masquerade``);
* ``ovs afpacket`` / ``ovs afxdp``: Open vSwitch's userspace datapath (a bridge with
  ``datapath_type=netdev``) with the veth ends as plain system ports (AF_PACKET
  sockets, polled by the main thread) or as ``type=afxdp`` ports (AF_XDP sockets on
  OVS's XDP program, polled by a PMD thread; ``xdp-mode=native``, falling back to
  ``generic``; one rx queue), OpenFlow rules that route like a router (match the dst
  subnet, set the Ethernet addresses, ``dec_ttl``, output); the hosts have a static
  neighbour entry for the gateway MAC. ``+ct``: the same through conntrack:
  ``ct(commit,nat(src=10.2.0.1))`` for new flows from the src side, ``ct(nat)`` for
  established and related ones, everything else dropped. vswitchd (main thread and
  PMD, ``pmd-cpu-mask=0x2``) is pinned to CPU 1; the PMD thread busy-polls, so the
  afxdp variants take a whole core whatever the load. It runs with a private db/run/log
  directory (a temp dir) and is stopped and removed after every run, also on failure
  or Ctrl-C. Without OVS installed, or where a variant cannot work here (e.g. AF_XDP
  on veth), the variant is reported as "skipped: <reason>" (OVS's own error text).

Sender: ``trafgen`` (netsniff-ng, ``-P 1``, pinned to CPU 0) in src sends ``--frames``
64-byte UDP frames (one flow) to dst through the forwarder, as fast as it can.
Sink: dst's eth0 drops every frame at ingress, so dst answers nothing: a tc matchall
drop if this kernel has it (delivered = eth0's rx_packets during the run), else an
nftables netdev ingress chain that counts the benchmark's UDP frames and drops
everything (delivered = that counter; eth0's rx_packets, which also has e.g. a
forwarder's ARP probes, is kept as ``eth0_rx_packets``). Both include the 0.5 s drain
after the send.

Per run: offered fps = frames / the time trafgen took; delivered fps = frames counted
at the sink / the same time; loss = 1 - delivered / sent; busy cores of the forwarder
over the send interval:

* dva and OVS: the CPU time (utime + stime, all threads, /proc/PID/stat of the
  process and its descendants) the forwarder took during the send, / the interval;
* kernel: its forwarding runs in softirq, not in a process of its own. It is the
  softirq + system time of all CPUs (/proc/stat) during the send minus trafgen's own
  CPU time (its rusage). Note that a veth transmit runs the receive side -- here the
  whole forwarding path, up to dst's ingress drop -- in the sender's softirq, on
  trafgen's CPU (so the kernel forwards on the sender's core, competing with it, and
  leaves CPU 1 idle). When the kernel charges that softirq time to the interrupted task
  as well (tick-based accounting without CONFIG_IRQ_TIME_ACCOUNTING, as on these VMs),
  trafgen's stime already contains the forwarding and the subtraction would remove
  it; then the kernel's busy cores are the softirq time of all CPUs alone (softirq in
  trafgen's context plus ksoftirqd), which still leaves out trafgen's own transmit
  path. Which formula was used is in the JSON meta (``kernel_busy_cores``); both
  figures are kept per run. For dva and OVS, their own transmit into the dst veth runs
  dst's receive (and the sink's drop) in their context too, so it is in their time;
  the kernel's delivery of the src frames to their sockets runs in trafgen's softirq
  and is in neither (``softirq_cores`` per run shows it).

CPU times come in clock ticks (10 ms), so busy cores are good to about +-0.01-0.03
at the default 300,000 frames (a PMD may read 1.01). Mpps per busy core = delivered
Mpps / busy cores. Ratios dva / peer are computed per
run (the same run's pair), for delivered Mpps and Mpps per busy core, with their
median. Results are printed and written as JSON (meta, every run, medians, ratios).
Needs root, trafgen (netsniff-ng), nft (nftables), taskset (util-linux) and, for the
OVS variants, Open vSwitch (openvswitch-switch). Other load on the machine shows up in
the figures.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dva.tools.demo import start_appliance, stop_appliance  # noqa: E402
from dva.tools.lab import Host, Lab, run  # noqa: E402

FORWARDERS = ("dva router", "dva router+fw+nat", "kernel", "kernel+nft",
              "ovs afpacket", "ovs afpacket+ct", "ovs afxdp", "ovs afxdp+ct")
PAIRS = (("dva router+fw+nat", "kernel+nft"), ("dva router+fw+nat", "ovs afxdp+ct"),
         ("dva router+fw+nat", "ovs afpacket+ct"), ("dva router", "kernel"),
         ("dva router", "ovs afxdp"), ("dva router", "ovs afpacket"))

SENDER_CPU, FORWARDER_CPU = 0, 1
SRC_NET, DST_NET = "10.1.0.0/24", "10.2.0.0/24"
SRC_IP, SRC_GW, DST_IP, DST_GW = "10.1.0.2", "10.1.0.1", "10.2.0.2", "10.2.0.1"
GW_MAC = "02:00:00:00:0d:01"  # the OVS router's MAC (static neighbour entry on the hosts)
OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVS_TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl",
             "ovs-appctl")
TICK = os.sysconf("SC_CLK_TCK")

from live_forward import ROUTER  # noqa: E402  (the same router, af_packet on both ends)

ROUTER_FW_NAT = """\
appliance: fwd
devices:
  r1:
    type: router
    ports:
      a: {{ip: 10.1.0.1/24}}
      b: {{ip: 10.2.0.1/24}}
  fw:
    type: firewall
    ports: [inside, outside]
    default: deny               # stateful: replies of allowed connections pass
    rules:
      - {{action: allow, from: inside}}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: 10.2.0.1}}        # masquerade behind the router's dst-side address
links:
  - [r1.b, fw.inside]
  - [fw.outside, nat.inside]
attach:
  r1.a: {{af_packet: {a}}}
  nat.outside: {{af_packet: {b}}}
"""

NFT_FORWARD = """\
table ip dva_bench {{  # (not 'fwd': an nft keyword)
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ct state new iifname "{a}" accept
  }}
  chain postrouting {{
    type nat hook postrouting priority 100;
    oifname "{b}" masquerade
  }}
}}
"""

NFT_SINK = """\
table netdev sink {
  chain ingress {
    type filter hook ingress device "eth0" priority 0;
    ip daddr 10.2.0.2 udp dport 9 counter drop
    drop
  }
}
"""


class Skip(Exception):
    """This variant cannot run on this machine (the message says why)."""


# ---------------------------------------------------------------- environment


def check_environment() -> None:
    """Refuse (sys.exit with the reason) when the suite cannot run here at all."""
    why = Lab.check_environment()
    if why:
        sys.exit(f"io_peers: {why}")
    for tool, pkg in (("trafgen", "netsniff-ng"), ("nft", "nftables"),
                      ("taskset", "util-linux"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            sys.exit(f"io_peers: needs {tool} (apt-get install {pkg})")


def ovs_missing() -> str | None:
    """Why the OVS variants cannot run here, or None."""
    missing = [t for t in OVS_TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs Open vSwitch ({', '.join(missing)} missing: " \
               f"apt-get install openvswitch-switch)"
    if not OVS_SCHEMA.exists():
        return f"needs Open vSwitch's schema {OVS_SCHEMA} (apt-get install openvswitch-switch)"
    return None


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def cpu_model() -> str:
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            return ln.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def irq_time_accounting() -> bool | None:
    """Whether the kernel accounts softirq time apart from the interrupted task."""
    try:
        import gzip

        cfg = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            cfg = Path(f"/boot/config-{platform.release()}").read_text()
        except OSError:
            return None
    return "CONFIG_IRQ_TIME_ACCOUNTING=y" in cfg


# ---------------------------------------------------------------- CPU accounting


def cpu_stat() -> dict[str, list[int]]:
    """/proc/stat's cpu lines: name -> [user nice system idle iowait irq softirq steal]."""
    rows = {}
    for ln in Path("/proc/stat").read_text().splitlines():
        if ln.startswith("cpu"):
            f = ln.split()
            rows[f[0]] = [int(x) for x in f[1:9]]
    return rows


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # [0] state, [1] ppid, [11] utime, [12] stime


def process_tree(pids: list[int]) -> list[int]:
    """The processes ``pids`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime (clock ticks) of each process, summed over all its threads."""
    out = {}
    for p in pids:
        f = _stat_fields(p)
        if f:
            out[p] = int(f[11]) + int(f[12])
    return out


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of these processes onto ``cpu`` (threads they start later inherit)."""
    for p in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for t in tids:
            try:
                os.sched_setaffinity(t, {cpu})
            except OSError:
                pass


# ---------------------------------------------------------------- lab pieces


def rx_packets(lab: Lab, h: Host) -> int:
    return int(lab.exec(h, ["cat", "/sys/class/net/eth0/statistics/rx_packets"]).stdout)


def softnet_dropped() -> int:
    """Frames dropped from full per-CPU input backlogs (/proc/net/softnet_stat col 2)."""
    return sum(int(ln.split()[1], 16) for ln in
               Path("/proc/net/softnet_stat").read_text().splitlines())


def install_sink(lab: Lab, h: Host, tmp: Path) -> str:
    """Drop everything at h's eth0 ingress; returns the method used."""
    if lab.exec(h, ["tc", "qdisc", "add", "dev", "eth0", "clsact"], check=False).returncode == 0:
        p = lab.exec(h, ["tc", "filter", "add", "dev", "eth0", "ingress", "matchall",
                         "action", "drop"], check=False)
        if p.returncode == 0:
            return "tc matchall drop"
        lab.exec(h, ["tc", "qdisc", "del", "dev", "eth0", "clsact"], check=False)
    f = tmp / "sink.nft"
    f.write_text(NFT_SINK)
    lab.exec(h, ["nft", "-f", str(f)])
    return "nft netdev ingress drop"


def sink_counter(lab: Lab, h: Host, method: str) -> int | None:
    """The benchmark's frames the sink's own counter saw (nft only; the rest of what eth0
    receives, e.g. a forwarder's ARP probes, is not counted)."""
    if not method.startswith("nft"):
        return None
    p = lab.exec(h, ["nft", "-j", "list", "table", "netdev", "sink"], check=False)
    try:
        for item in json.loads(p.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    except (ValueError, KeyError, TypeError):
        pass
    return None


def warm_up(lab: Lab, h1: Host) -> str:
    """A ping src -> dst through the forwarder: forwarders learn MACs, flows get set up."""
    p = lab.exec(h1, ["ping", "-c", "3", "-i", "0.2", "-W", "2", DST_IP], check=False)
    if p.returncode == 0:
        return "ok"
    last = [ln for ln in p.stdout.splitlines() if "transmitted" in ln]
    return "failed: " + (last[0].strip() if last else p.stderr.strip())


def neigh_mac(lab: Lab, h: Host, ip: str) -> str:
    out = lab.exec(h, ["ip", "neigh", "show", ip]).stdout.split()
    if "lladdr" not in out:
        raise RuntimeError(f"{h.name} has no neighbour entry for {ip} (forwarding broken?)")
    return out[out.index("lladdr") + 1]


def blast(lab: Lab, h1: Host, dst_mac: str, frames: int, tmp: Path,
          pids: list[int] | None) -> dict:
    """Send ``frames`` with trafgen; times and CPU use over the send interval."""
    cfg = tmp / "frame.cfg"
    cfg.write_text(f"{{ eth(da={dst_mac}, sa={h1.mac}), ipv4(sa={SRC_IP}, da={DST_IP}, "
                   f"ttl=64), udp(sp=4000, dp=9), fill(0x00, 18) }}\n")
    err = tmp / "trafgen.err"
    # Leave the (global) socket memory sysctls and IRQ affinities alone.
    cmd = ["ip", "netns", "exec", h1.ns, "taskset", "-c", str(SENDER_CPU), "trafgen",
           "-o", "eth0", "-i", str(cfg), "-n", str(frames), "-P", "1", "-q", "--no-sock-mem",
           "--notouch-irq"]
    tree = process_tree(pids) if pids else []
    with err.open("w") as ef:
        cpu0, ticks0 = cpu_stat(), proc_ticks(tree)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ef)
        killer = threading.Timer(120, lambda: os.kill(p.pid, signal.SIGKILL))
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM: no sender left behind
            p.kill()
            p.wait()
            raise
        finally:
            killer.cancel()
        dt = time.monotonic() - t0
        cpu1, ticks1 = cpu_stat(), proc_ticks(tree)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"trafgen exited with {p.returncode}: {err.read_text().strip()}")
    d = {k: [b - a for a, b in zip(cpu0[k], cpu1[k])] for k in cpu1 if k in cpu0}
    fwd = sum(ticks1.get(q, t) - t for q, t in ticks0.items()) / TICK
    return {"seconds": dt, "trafgen_cpu_s": ru.ru_utime + ru.ru_stime,
            "forwarder_cpu_s": fwd if pids else None,
            "cpu_ticks": {k: dict(zip(("user", "nice", "system", "idle", "iowait", "irq",
                                       "softirq", "steal"), v)) for k, v in d.items()}}


def measure(lab: Lab, h1: Host, h2: Host, dst_mac: str, frames: int, tmp: Path,
            pids: list[int] | None) -> dict:
    sink = install_sink(lab, h2, tmp)
    rx0, c0, sn0 = rx_packets(lab, h2), sink_counter(lab, h2, sink), softnet_dropped()
    b = blast(lab, h1, dst_mac, frames, tmp, pids)
    time.sleep(0.5)  # let the forwarder drain
    rx1, c1, sn1 = rx_packets(lab, h2), sink_counter(lab, h2, sink), softnet_dropped()
    dt = b["seconds"]
    got = (c1 - c0) if c0 is not None and c1 is not None else rx1 - rx0
    tot = b["cpu_ticks"]["cpu"]
    softirq = tot["softirq"] / TICK / dt
    sys_softirq = (tot["system"] + tot["softirq"]) / TICK / dt
    trafgen = b["trafgen_cpu_s"] / dt
    if pids:
        busy = b["forwarder_cpu_s"] / dt
    elif KERNEL_BUSY == "softirq":
        busy = softirq
    else:
        busy = sys_softirq - trafgen
    return {"seconds": dt, "sent": frames, "delivered": got,
            "eth0_rx_packets": rx1 - rx0,
            "sink": sink, "offered_mpps": frames / dt / 1e6, "delivered_mpps": got / dt / 1e6,
            "loss": 1 - got / frames, "busy_cores": busy,
            "mpps_per_core": (got / dt / 1e6) / busy if busy > 0 else None,
            "trafgen_cores": trafgen, "softirq_cores": softirq,
            "system_softirq_minus_trafgen_cores": sys_softirq - trafgen,
            "softnet_dropped": sn1 - sn0, "cpu_ticks": b["cpu_ticks"]}


# Set by run_suite: how the kernel variants' busy cores are derived (see the docstring).
KERNEL_BUSY = "softirq"


# ---------------------------------------------------------------- forwarders


@dataclass
class Fwd:
    mac: str = ""  # the gateway MAC src sends to ("" : learn it from src's neighbour table)
    pids: list[int] | None = None  # processes whose CPU time is the forwarder's
    info: dict = field(default_factory=dict)  # extras for the run's record


@contextmanager
def dva_forwarder(lab: Lab, h1: Host, h2: Host, tmp: Path, name: str):
    app = tmp / "fwd.yaml"
    app.write_text((ROUTER_FW_NAT if "nat" in name else ROUTER)
                   .format(a=h1.outside, b=h2.outside))
    proc, _ = start_appliance(app, tmp, ["--workers", "0"])
    fwd = Fwd(pids=[proc.pid])
    try:
        pin(process_tree([proc.pid]), FORWARDER_CPU)
        yield fwd
    finally:
        code, counters, err = stop_appliance(proc)
        fwd.info["drops"] = {k: v for k, v in counters.items() if "drop/" in k and v}
        if code != 0:
            raise RuntimeError(f"dva run failed ({code}): {err.strip()[-2000:]}")


@contextmanager
def kernel_forwarder(lab: Lab, h1: Host, h2: Host, tmp: Path, name: str):
    kr = f"{lab.prefix}-kr"
    run(["ip", "netns", "add", kr])
    try:
        for h, ip in ((h1, f"{SRC_GW}/24"), (h2, f"{DST_GW}/24")):
            run(["ip", "link", "set", h.outside, "netns", kr])
            run(["ip", "netns", "exec", kr, "ip", "addr", "add", ip, "dev", h.outside])
            run(["ip", "netns", "exec", kr, "ip", "link", "set", h.outside, "up"])
        run(["ip", "netns", "exec", kr, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if "nft" in name:
            f = tmp / "fwd.nft"
            f.write_text(NFT_FORWARD.format(a=h1.outside, b=h2.outside))
            run(["ip", "netns", "exec", kr, "nft", "-f", str(f)])
        yield Fwd()
    finally:
        run(["ip", "netns", "del", kr], check=False)
        lab.links.clear()  # they went with the namespace


class Ovs:
    """A private ovsdb-server + ovs-vswitchd (state, sockets and logs in ``dir``)."""

    def __init__(self, d: Path):
        self.dir = d
        self.env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_DBDIR": str(d),
                    "OVS_LOGDIR": str(d), "OVS_SYSCONFDIR": str(d)}
        self.db = f"--db=unix:{d}/db.sock"
        self.links_before = set(os.listdir("/sys/class/net"))
        self.log_seen = 0  # lines of vswitchd.log already reported

    def sh(self, cmd: list[str], check: bool = True, timeout: float = 30
           ) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def vsctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(["ovs-vsctl", self.db, "--timeout=20", *args], check=check)

    def appctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(["ovs-appctl", "-t", str(self.dir / "vswitchd.ctl"), *args], check=check)

    def pid(self, name: str) -> int | None:
        try:
            return int((self.dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        d = self.dir
        if "ovs-netdev" in self.links_before:
            raise Skip("another Open vSwitch userspace datapath (link ovs-netdev) is running")
        self.sh(["ovsdb-tool", "create", f"{d}/conf.db", str(OVS_SCHEMA)])
        self.sh(["ovsdb-server", f"--remote=punix:{d}/db.sock", f"--pidfile={d}/ovsdb.pid",
                 "--detach", f"--log-file={d}/ovsdb.log", f"--unixctl={d}/ovsdb.ctl",
                 f"{d}/conf.db"])
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".",
                   f"other_config:pmd-cpu-mask={1 << FORWARDER_CPU:#x}")
        self.sh(["taskset", "-c", str(FORWARDER_CPU), "ovs-vswitchd", f"unix:{d}/db.sock",
                 f"--pidfile={d}/vswitchd.pid", "--detach", f"--log-file={d}/vswitchd.log",
                 f"--unixctl={d}/vswitchd.ctl"])

    def log_errors(self, n: int = 6) -> str:
        """vswitchd's errors and warnings logged since the last call (distinct, last n)."""
        try:
            lines = (self.dir / "vswitchd.log").read_text().splitlines()
        except OSError:
            return ""
        new, self.log_seen = lines[self.log_seen:], len(lines)
        errs = dict.fromkeys(ln.split("|", 4)[-1] for ln in new
                             if ("|ERR|" in ln or "|WARN|" in ln) and "RLIMIT_MEMLOCK" not in ln)
        return "; ".join(list(errs)[-n:])

    def stop(self) -> None:
        vs, db = self.pid("vswitchd"), self.pid("ovsdb")
        if vs:
            self.appctl("exit", "--cleanup", check=False)
        if db:
            self.sh(["ovs-appctl", "-t", str(self.dir / "ovsdb.ctl"), "exit"], check=False)
        for p in (vs, db):
            if p and not _wait_gone(p, 5):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_gone(p, 5)
        # The datapath's and bridges' tap devices, if an unclean exit left them.
        for link in set(os.listdir("/sys/class/net")) - self.links_before:
            if link == "ovs-netdev" or link.endswith("obr"):
                run(["ip", "link", "del", link], check=False)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = _stat_fields(pid)
        if f is None or f[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def ovs_flows(h1: Host, h2: Host, ct: bool) -> str:
    to_dst = f"mod_dl_src:{GW_MAC},mod_dl_dst:{h2.mac},dec_ttl,output:2"
    to_src = f"mod_dl_src:{GW_MAC},mod_dl_dst:{h1.mac},dec_ttl,output:1"
    if not ct:
        return (f"priority=100,ip,in_port=1,nw_dst={DST_NET},actions={to_dst}\n"
                f"priority=100,ip,in_port=2,nw_dst={SRC_NET},actions={to_src}\n"
                "priority=0,actions=drop\n")
    return ("table=0,priority=100,ip,actions=ct(table=1,zone=1,nat)\n"
            "table=0,priority=0,actions=drop\n"
            f"table=1,priority=100,ct_state=+trk+new,ip,in_port=1,nw_dst={DST_NET},"
            f"actions=ct(commit,zone=1,nat(src={DST_GW})),{to_dst}\n"
            f"table=1,priority=100,ct_state=+trk+est,ip,in_port=1,nw_dst={DST_NET},"
            f"actions={to_dst}\n"
            f"table=1,priority=100,ct_state=+trk+est,ip,in_port=2,nw_dst={SRC_NET},"
            f"actions={to_src}\n"
            f"table=1,priority=100,ct_state=+trk+rel,ip,in_port=2,nw_dst={SRC_NET},"
            f"actions={to_src}\n"
            "table=1,priority=0,actions=drop\n")


@contextmanager
def ovs_forwarder(lab: Lab, h1: Host, h2: Host, tmp: Path, name: str):
    why = ovs_missing()
    if why:
        raise Skip(why)
    for h, gw in ((h1, SRC_GW), (h2, DST_GW)):
        lab.exec(h, ["ip", "neigh", "replace", gw, "lladdr", GW_MAC, "dev", "eth0"])
    ovs = Ovs(tmp / "ovs")
    ovs.dir.mkdir()
    try:
        ovs.start()
        vs = ovs.pid("vswitchd")
        if vs is None:
            raise RuntimeError(f"ovs-vswitchd did not start: {ovs.log_errors()}")
        pin(process_tree([vs]), FORWARDER_CPU)
        br = f"{lab.prefix[:9]}obr"
        ovs.vsctl("add-br", br, "--", "set", "bridge", br, "datapath_type=netdev")
        afxdp = "afxdp" in name
        modes = ["native", "generic"] if afxdp else [None]
        fails = []
        for mode in modes:
            for i, h in ((1, h1), (2, h2)):
                iface = ["--", "set", "interface", h.outside, f"ofport_request={i}"]
                if mode:
                    iface += ["type=afxdp", f"options:xdp-mode={mode}", "options:n_rxq=1"]
                ovs.vsctl("--may-exist", "add-port", br, h.outside, *iface)
            errs = [ovs.vsctl("get", "interface", h.outside, "error").stdout.strip()
                    for h in (h1, h2)]
            ports = [ovs.vsctl("get", "interface", h.outside, "ofport").stdout.strip()
                     for h in (h1, h2)]
            ok = ports == ["1", "2"] and all(e in ("[]", "") for e in errs)
            if ok:
                ovs.sh(["ovs-ofctl", "del-flows", br])
                (tmp / "flows").write_text(ovs_flows(h1, h2, "+ct" in name))
                ovs.sh(["ovs-ofctl", "add-flows", br, str(tmp / "flows")])
                w = warm_up(lab, h1)
                if w == "ok":
                    break
                fails.append(f"{mode or 'system'}: ports up but no forwarding ({w}); "
                             f"{ovs.log_errors()}")
            else:
                fails.append(f"{mode or 'system'}: ofport {ports}, error {errs}; "
                             f"{ovs.log_errors()}")
            for h in (h1, h2):
                ovs.vsctl("--if-exists", "del-port", br, h.outside, check=False)
        else:
            raise Skip(" | ".join(fails))
        pin(process_tree([vs]), FORWARDER_CPU)  # threads started since (PMD, handlers)
        info = {"ovs_port_type": f"afxdp xdp-mode={mode}" if mode else "system (AF_PACKET)"}
        if fails:
            info["ovs_port_fallbacks"] = fails
        fwd = Fwd(mac=GW_MAC, pids=[vs], info=info)
        yield fwd
        pmd = ovs.appctl("dpif-netdev/pmd-stats-show", check=False).stdout
        fwd.info["ovs_pmd_stats"] = [ln.strip() for ln in pmd.splitlines()
                                     if re.search(r"thread|received|hits|miss|drop", ln)]
        dp = ovs.appctl("dpctl/show", "-s", check=False).stdout
        fwd.info["ovs_dp_ports"] = [ln.strip() for ln in dp.splitlines()
                                    if re.search(r"port \d|packets", ln)]
    finally:
        ovs.stop()


def forwarder(name: str):
    if name.startswith("dva"):
        return dva_forwarder
    if name.startswith("kernel"):
        return kernel_forwarder
    return ovs_forwarder


def run_one(name: str, frames: int) -> dict:
    """One measurement of one forwarder, on a fresh lab."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="dva-io-peers-") as tmp:
        h1 = lab.host("src", f"{SRC_IP}/24", SRC_GW)
        h2 = lab.host("dst", f"{DST_IP}/24", DST_GW)
        with forwarder(name)(lab, h1, h2, Path(tmp), name) as fwd:
            warm = warm_up(lab, h1)
            mac = fwd.mac or neigh_mac(lab, h1, SRC_GW)
            res = measure(lab, h1, h2, mac, frames, Path(tmp), fwd.pids)
            res["warm_up"] = warm
        res.update(fwd.info)
    return res


# ---------------------------------------------------------------- suite


def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


METRICS = ("delivered_mpps", "offered_mpps", "loss", "busy_cores", "mpps_per_core")


def select(only: list[str] | None) -> list[str]:
    if not only:
        return list(FORWARDERS)
    out = []
    for item in only:
        item = item.strip()
        hits = [item] if item in FORWARDERS else [f for f in FORWARDERS if f.startswith(item)]
        if not hits:
            sys.exit(f"io_peers: unknown forwarder {item!r}; choose from {', '.join(FORWARDERS)}")
        out += [h for h in hits if h not in out]
    return [f for f in FORWARDERS if f in out]


def run_suite(runs: int, frames: int, only: list[str] | None, command: str | None = None,
              say=print) -> dict:
    """Run the suite; returns the result dict (meta, runs, medians, ratios, skipped)."""
    global KERNEL_BUSY
    check_environment()
    names = select(only)
    irq_acct = irq_time_accounting()
    KERNEL_BUSY = "system+softirq-trafgen" if irq_acct else "softirq"
    skipped: dict[str, str] = {}
    if any(n.startswith("ovs") for n in names) and ovs_missing():
        for n in names:
            if n.startswith("ovs"):
                skipped[n] = ovs_missing()
        say(f"io_peers: skipping the OVS variants: {ovs_missing()}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if n in skipped:
                results[n].append({"skipped": skipped[n]})
                continue
            try:
                res = run_one(n, frames)
            except Skip as e:
                skipped[n] = str(e)
                results[n].append({"skipped": str(e)})
                say(f"run {r + 1}/{runs} {n:18} skipped: {e}")
                continue
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                results[n].append({"error": str(e)})
                say(f"run {r + 1}/{runs} {n:18} ERROR: {e}")
                continue
            results[n].append(res)
            say(f"run {r + 1}/{runs} {n:18} delivered {res['delivered_mpps']:.3f} Mpps of "
                f"{res['offered_mpps']:.3f} offered, loss {res['loss']:.1%}, busy "
                f"{res['busy_cores']:.2f} cores"
                + (f", {res['mpps_per_core']:.3f} Mpps/core" if res['mpps_per_core'] else "")
                + ("" if res["warm_up"] == "ok" else f" (warm-up {res['warm_up']})"))
    ok = {n: [x for x in v if "delivered_mpps" in x] for n, v in results.items()}
    medians = {n: {m: _spread([x[m] for x in v]) for m in METRICS} for n, v in ok.items() if v}
    ratios = {}
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        per = {"delivered_mpps": [], "mpps_per_core": []}
        for ra, rb in zip(results[a], results[b]):
            for m in per:
                va, vb = ra.get(m), rb.get(m)
                if va is not None and vb:
                    per[m].append(va / vb)
        ratios[f"{a} / {b}"] = {m: {**(_spread(v) or {}), "per_run": v} for m, v in per.items()}
    meta = {"command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {cpu_model()}",
            "kernel": platform.release(),
            "ovs": tool_version(["ovs-vswitchd", "--version"]),
            "trafgen": tool_version(["trafgen", "-v"]),
            "nft": tool_version(["nft", "--version"]),
            "frames_per_run": frames, "runs": runs,
            "sender": f"trafgen -P 1 -q --no-sock-mem --notouch-irq pinned to CPU "
                      f"{SENDER_CPU}, 64-byte UDP frames, one flow, as fast as it can",
            "forwarder_cpu": FORWARDER_CPU,
            "irq_time_accounting": irq_acct,
            "kernel_busy_cores": KERNEL_BUSY,
            "busy_cores": "dva/ovs: utime+stime of the forwarder's processes (all threads, "
                          "descendants) during the send / send time; kernel: "
                          + ("softirq+system of all CPUs minus trafgen's CPU time"
                             if irq_acct else "softirq of all CPUs (softirq time is also "
                             "charged to trafgen here, so subtracting trafgen would remove "
                             "the forwarding)") + " / send time"}
    return {"meta": meta, "medians": medians, "ratios": ratios, "skipped": skipped,
            "runs": results}


def _fmt(s: dict | None, spec: str, pct: bool = False) -> str:
    if not s or "median" not in s:
        return "-"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: format(v, spec))
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"


def format_table(res: dict) -> str:
    lines = [f"{'forwarder':18} {'delivered Mpps':>22} {'offered Mpps':>22} {'loss':>20} "
             f"{'busy cores':>18} {'Mpps/busy core':>22}"]
    for n, v in res["runs"].items():
        if n in res["medians"]:
            m = res["medians"][n]
            lines.append(f"{n:18} {_fmt(m['delivered_mpps'], '.3f'):>22} "
                         f"{_fmt(m['offered_mpps'], '.3f'):>22} "
                         f"{_fmt(m['loss'], '', pct=True):>20} "
                         f"{_fmt(m['busy_cores'], '.2f'):>18} "
                         f"{_fmt(m['mpps_per_core'], '.3f'):>22}")
        else:
            why = res["skipped"].get(n) or next((x.get("error") for x in v if "error" in x), "")
            lines.append(f"{n:18} {'skipped' if n in res['skipped'] else 'failed'}: {why}")
    lines.append("")
    lines.append("medians [min-max] over runs; ratios per run, dva / peer:")
    lines.append(f"{'':38} {'delivered Mpps':>22} {'Mpps/busy core':>22}")
    for k, r in res["ratios"].items():
        lines.append(f"{k:38} {_fmt(r['delivered_mpps'] or None, '.2f'):>22} "
                     f"{_fmt(r['mpps_per_core'] or None, '.2f'):>22}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--only", default=None,
                    help="forwarders to run, comma-separated (a prefix picks all that start "
                         f"with it, e.g. 'ovs'): {', '.join(FORWARDERS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "io_peers.json"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("io_peers: terminated"))
    res = run_suite(a.runs, a.frames, a.only.split(",") if a.only else None,
                    command="python benchmarks/io_peers.py " + " ".join(sys.argv[1:]))
    print()
    print(format_table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
