"""The multi-process runtime on live ports: hot reconfiguration and a worker crash
while real hosts send traffic through it.

Two hosts in one subnet, "inside" and "outside" (network namespaces), joined by an
appliance that ``dva run --workers 2`` runs (a dispatcher and two worker processes),
with a control socket. Traffic: UDP datagrams with a sequence number on many flows
(so both workers carry some), sent at a fixed rate from inside and counted per flow
by a receiver outside, and a long TCP connection to an echo server. Every namespace,
link and process is removed afterwards, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from test_firewall_live import ECHO_CLIENT, ECHO_SERVER, Appliance

from dva.control.sock import request
from dva.packet.steer import flow_buckets
from dva.tools.lab import Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)

UDP_PORT = 5001
FLOWS = 24
BASE_SPORT = 21000

# Datagrams "seq" round robin over FLOWS source ports at RATE per second until the
# stop file exists; prints the count sent per source port (JSON).
SENDER = r"""
import json, os, socket, sys, time
dst, dport, nflows, base, rate, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
socks = []
for j in range(nflows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", base + j))
    socks.append(s)
sent = [0] * nflows
t0 = time.monotonic()
i = 0
print("sending", flush=True)
while not (i % 64 == 0 and os.path.exists(stop)):
    j = i % nflows
    socks[j].sendto(str(sent[j]).encode().ljust(64, b"."), (dst, dport))
    sent[j] += 1
    i += 1
    pause = t0 + i / rate - time.monotonic()
    if pause > 0:
        time.sleep(pause)
print(json.dumps({str(base + j): sent[j] for j in range(nflows)}), flush=True)
"""

# Counts per source port: datagrams, distinct sequence numbers, and datagrams that
# came after a higher number of their flow (reordered). Ends 1 s after the stop file
# appears with nothing more arriving; prints JSON.
RECEIVER = r"""
import json, os, socket, sys
addr, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((addr, port))
s.settimeout(1.0)
seen, last, late = {}, {}, {}
print("listening", flush=True)
while True:
    try:
        data, (_, sport) = s.recvfrom(2048)
    except socket.timeout:
        if os.path.exists(stop):
            break
        continue
    seq = int(data.split(b".")[0])
    seen.setdefault(sport, set()).add(seq)
    if seq < last.get(sport, -1):
        late[sport] = late.get(sport, 0) + 1
    last[sport] = max(seq, last.get(sport, -1))
print(json.dumps({str(p): [len(v), late.get(p, 0)] for p, v in seen.items()}), flush=True)
"""


def appliance_text(inside: str, outside: str, rules: list[str], policer: bool) -> str:
    """A firewall, optionally a policer, then a switch between the two hosts."""
    devices = [
        "  fw:\n    type: firewall\n    ports: [inside, outside]\n    default: deny\n"
        f"    rules: [{', '.join(rules)}]",
        "  sw: {type: switch, ports: [up, out]}",
    ]
    if policer:
        devices.append("  pol: {type: policer, ports: [inside, outside], rate: 1gbit}")
        links = "  - [fw.outside, pol.inside]\n  - [pol.outside, sw.up]"
    else:
        links = "  - [fw.outside, sw.up]"
    return ("appliance: hot\ntenant: lab\ndevices:\n" + "\n".join(devices) + "\nlinks:\n"
            + links + f"\nattach:\n  fw.inside: {{af_packet: {inside}}}\n"
            f"  sw.out: {{af_packet: {outside}}}\n")


BASE_RULES = ["{action: allow, from: inside}"]


def generation_rules(i: int) -> list[str]:
    """The rules of change ``i``: what inside sends is always allowed; the rest is
    edited (other ports denied or rejected, rules reordered, added and removed)."""
    extra = [f"{{action: deny, from: outside, proto: tcp, dport: {1000 + i}}}",
             f"{{action: reject, from: outside, proto: udp, dport: {2000 + i % 7}}}"]
    if i % 3 == 0:
        extra.append("{action: allow, from: outside, proto: icmp}")
    if i % 2:
        return BASE_RULES + extra
    return [extra[0]] + BASE_RULES + extra[1:]


class Traffic:
    """The UDP sender and receiver and the TCP echo client, between two hosts."""

    def __init__(self, lab: Lab, inside, outside, workdir: Path, rate: float,
                 echo: bool = True) -> None:
        self.lab = lab
        self.stopfile = workdir / "stop-traffic"
        self.stopfile.unlink(missing_ok=True)
        self.recv = lab.popen(outside, ["python3", "-c", RECEIVER, outside.addr,
                                        str(UDP_PORT), str(self.stopfile)], text=True)
        assert self.recv.stdout.readline().strip() == "listening"
        # ARP both ways before the counted traffic starts
        lab.exec(inside, ["ping", "-c", "2", "-i", "0.2", "-W", "2", outside.addr])
        self.echo = self.echo_server = None
        if echo:
            self.echo_server = lab.popen(outside, ["python3", "-c", ECHO_SERVER,
                                                   outside.addr, "7000"], text=True)
            assert self.echo_server.stdout.readline().strip() == "listening"
            self.echo = lab.popen(inside, ["python3", "-c", ECHO_CLIENT, outside.addr,
                                           "7000"], text=True)
            assert self.echo.stdout.readline().strip() == "ok 0"
        self.send = lab.popen(inside, ["python3", "-c", SENDER, outside.addr, str(UDP_PORT),
                                       str(FLOWS), str(BASE_SPORT), str(rate),
                                       str(self.stopfile)], text=True)
        assert self.send.stdout.readline().strip() == "sending"

    def finish(self) -> tuple[dict[int, int], dict[int, tuple[int, int]], list[str]]:
        """Stop; (sent per source port, (received, reordered) per port, echo lines)."""
        self.stopfile.touch()
        out, err = self.send.communicate(timeout=30)
        sent = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
        out, err = self.recv.communicate(timeout=30)
        got = {int(k): tuple(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}
        if self.echo is None:
            return sent, got, []
        self.echo.send_signal(signal.SIGTERM)
        echo_out, _ = self.echo.communicate(timeout=10)
        self.echo_server.kill()
        return sent, got, echo_out.splitlines()


def echo_ok(lines: list[str]) -> int:
    assert not any(ln.startswith("error") for ln in lines), lines[-5:]
    return sum(ln.startswith("ok ") for ln in lines)


@pytest.fixture
def hosts(tmp_path):
    with Lab() as lab:
        inside = lab.host("inside", "10.79.0.1/24")
        outside = lab.host("outside", "10.79.0.2/24")
        apps: list[Appliance] = []
        try:
            yield lab, inside, outside, tmp_path, apps
        finally:
            for a in apps:
                code, _, err = a.stop()
                print(f"dva run exited with {code}; its stderr:\n{err}")
    assert leftovers(lab.prefix) == []


def start(hosts, text: str) -> tuple[Appliance, Path, str]:
    lab, inside, outside, work, apps = hosts
    path = work / "hot.yaml"
    path.write_text(text)
    sock = str(work / "hot.sock")
    app = Appliance(path, work, ("--workers", "2", "--control", sock))
    apps.append(app)
    return app, path, sock


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_hundred_hot_changes_lose_nothing_and_keep_connections(hosts):
    lab, inside, outside, work, _ = hosts
    text = lambda i, pol: appliance_text(inside.outside, outside.outside,  # noqa: E731
                                         generation_rules(i), pol)
    shm = set(os.listdir("/dev/shm"))
    app, path, sock = start(hosts, text(0, False))
    traffic = Traffic(lab, inside, outside, work, rate=1500)
    t0 = time.monotonic()
    policer_seen = 0
    for i in range(1, 101):
        pol = (i // 10) % 2 == 1  # the policer is added and removed every 10 changes
        policer_seen += pol
        write(path, text(i, pol))
        if i % 25 == 1:  # the CLI's path, now and then (the rest: the same request)
            p = subprocess.run([os.sys.executable, "-m", "dva.cli", "apply", str(path),
                                "--control", sock], capture_output=True, text=True,
                               timeout=120)
            assert p.returncode == 0, p.stderr
            assert f"generation {i + 1}" in p.stdout, p.stdout
        else:
            r = request(sock, {"op": "apply", "file": str(path)})
            assert r["ok"], r
            assert r["generation"] == i + 1
        if i == 50:  # an invalid change is refused; the running generation stays
            write(path, text(i, pol).replace("action: deny", "action: maybe"))
            r = request(sock, {"op": "apply", "file": str(path)})
            assert not r["ok"] and "generation 51 keeps running" in r["error"], r
    took = time.monotonic() - t0
    time.sleep(1.0)  # traffic on the last generation too
    st = request(sock, {"op": "status"})["status"]
    sent, got, echo = traffic.finish()
    code, c, err = app.stop()
    assert code == 0, err
    assert set(os.listdir("/dev/shm")) - shm == set()  # the bus is no named segment
    assert policer_seen == 50
    assert st["generation"] == 101
    assert [u["generation"] for u in st["units"]] == [101, 101]
    assert c["config generation"] == 101 and c["config reloads_rejected"] == 1
    # 0 lost, 0 reordered within any flow, on every flow of both workers
    lost = {p: sent[p] - got.get(p, (0, 0))[0] for p in sent}
    assert sum(sent.values()) > 1500 * took * 0.5
    assert all(v == 0 for v in lost.values()), (lost, took)
    assert all(got[p][1] == 0 for p in got), got
    # the TCP connection lived through every change and kept echoing
    assert echo_ok(echo) >= took / 0.2 * 0.5, echo[-3:]
    assert c["fw drop/invalid"] == 0
    for w in (0, 1):
        assert c[f"bus w{w} drop/ring_full"] == 0 and c[f"worker w{w} restarts"] == 0


def test_a_killed_worker_is_back_within_two_seconds_and_the_other_loses_nothing(hosts):
    lab, inside, outside, work, _ = hosts
    text = appliance_text(inside.outside, outside.outside, BASE_RULES, False)
    app, path, sock = start(hosts, text)
    # a second generation first: the restarted worker must come back with it
    write(path, appliance_text(inside.outside, outside.outside, generation_rules(1), False))
    assert request(sock, {"op": "apply", "file": str(path)})["generation"] == 2
    table = request(sock, {"op": "buckets"})["table"]
    frames = [bytes(Ether(src=inside.mac, dst=outside.mac)
                    / IP(src=inside.addr, dst=outside.addr)
                    / UDP(sport=BASE_SPORT + j, dport=UDP_PORT) / (b"0" * 64))
              for j in range(FLOWS)]
    owner = {BASE_SPORT + j: table[int(b)]
             for j, b in enumerate(flow_buckets(frames, nbuckets=len(table)))}
    assert set(owner.values()) == {0, 1}, owner  # both workers carry flows
    # (no TCP connection here: a restarted worker starts with empty flow state, so a
    # connection in its buckets would be refused as invalid by the firewall)
    traffic = Traffic(lab, inside, outside, work, rate=2000, echo=False)
    time.sleep(1.5)
    before = {u["unit"]: u for u in request(sock, {"op": "status"})["status"]["units"]}
    victim = before["worker 1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    back = None
    while time.monotonic() - killed < 10:
        u = {x["unit"]: x for x in request(sock, {"op": "status"})["status"]["units"]}
        w1 = u["worker 1"]
        if w1["alive"] and w1["pid"] != victim and w1["restarts"] == 1 \
                and w1["heartbeat_age_s"] is not None and w1["heartbeat_age_s"] < 0.1:
            back = time.monotonic() - killed
            assert w1["generation"] == 2
            break
        time.sleep(0.02)
    assert back is not None and back < 2.0, back
    time.sleep(1.5)
    sent, got, echo = traffic.finish()
    code, c, err = app.stop()
    assert code == 0, err
    assert "worker 1" in err and "died" in err
    lost = {p: sent[p] - got.get(p, (0, 0))[0] for p in sent}
    on0 = [p for p in sent if owner[p] == 0]
    on1 = [p for p in sent if owner[p] == 1]
    # the surviving worker's flows lost nothing; the dead one's only what it held
    assert all(lost[p] == 0 for p in on0), {p: lost[p] for p in on0}
    assert all(got[p][1] == 0 for p in got), got
    assert all(got[p][0] > 0.5 * sent[p] for p in on1)
    assert c["worker w1 restarts"] == 1 and c["worker w0 restarts"] == 0
    assert sum(lost[p] for p in on1) <= c["bus w1 slots_reclaimed"]
    assert c["bus w0 drop/ring_full"] == 0 and c["bus w0 drop/worker_died"] == 0
    assert c["config generation"] == 2


def test_scaling_1_2_1_under_iperf3_and_a_download_keeps_every_connection(tmp_path):
    """iperf3 TCP and a rate-limited curl download through router, firewall and NAT
    (the demo's appliance) while ``dva scale`` goes 1 -> 2 -> 1 workers: both finish,
    nothing is reset, and the server sees each connection from one NAT port."""
    from dva.tools.demo import APPLIANCE as DEMO

    with Lab() as lab:
        h1 = lab.host("h1", "10.0.0.11/24", "10.0.0.1")
        h2 = lab.host("h2", "10.0.0.12/24", "10.0.0.1")
        inet = lab.host("inet", "198.51.100.10/24", "198.51.100.1")
        www = tmp_path / "www"
        www.mkdir()
        (www / "big").write_bytes(os.urandom(3 << 20))
        lab.http_server(inet, 8080, str(www))
        path = tmp_path / "demo.yaml"
        path.write_text(DEMO.format(h1=h1.outside, h2=h2.outside, inet=inet.outside))
        sock = str(tmp_path / "demo.sock")
        shm = set(os.listdir("/dev/shm"))
        app = Appliance(path, tmp_path, ("--workers", "1", "--control", sock))
        try:
            lab.exec(h1, ["ping", "-c", "2", "-i", "0.2", "-W", "2", inet.addr])
            srv = lab.popen(inet, ["iperf3", "-s", "-1", "-J", "-p", "5201"], text=True)
            time.sleep(0.5)
            ip = lab.popen(h1, ["iperf3", "-c", inet.addr, "-p", "5201", "-t", "8", "-J"],
                           text=True)
            dl = lab.popen(h1, ["curl", "-sS", "-o", str(tmp_path / "got"), "-w",
                                "%{size_download} %{local_port}", "--limit-rate", "500k",
                                "--max-time", "30", f"http://{inet.addr}:8080/big"],
                           text=True)
            scaled = []
            for n, at in ((2, 2.0), (1, 5.0)):
                time.sleep(at - (2.0 if n == 1 else 0.0))
                p = subprocess.run([os.sys.executable, "-m", "dva.cli", "scale", sock,
                                    "--workers", str(n)], capture_output=True, text=True,
                                   timeout=60)
                assert p.returncode == 0, p.stderr
                scaled.append(p.stdout.strip())
            ip_out, _ = ip.communicate(timeout=60)
            dl_out, dl_err = dl.communicate(timeout=60)
            srv_out, _ = srv.communicate(timeout=30)
            st = request(sock, {"op": "status"})["status"]
        finally:
            code, c, err = app.stop()
    assert code == 0, err
    assert set(os.listdir("/dev/shm")) - shm == set()  # no staged move left behind
    assert scaled[0].startswith("2 workers; 2048 buckets moved"), scaled
    assert scaled[1].startswith("1 workers; 2048 buckets moved"), scaled
    assert any("scaled 1 -> 2" in d for d in st["decisions"])
    assert any("scaled 2 -> 1" in d for d in st["decisions"])
    # the download: every byte, one connection
    assert dl.returncode == 0, dl_err
    assert dl_out.split()[0] == str(3 << 20)
    assert (tmp_path / "got").read_bytes() == (www / "big").read_bytes()
    # iperf3: the transfer completed; the server saw the data connection from one
    # address and port (the NAT's) all along
    client = json.loads(ip_out)
    assert "error" not in client, client.get("error")
    assert client["end"]["sum_received"]["bytes"] > 0
    server = json.loads(srv_out)
    peers = {(s["remote_host"], s["remote_port"]) for s in server["start"]["connected"]}
    assert len(peers) == 1 and next(iter(peers))[0] == "198.51.100.1", peers
    assert c["fw drop/invalid"] == 0 and c["nat drop/invalid"] == 0
    assert c["migration moves"] >= 2 and c["migration buckets_moved"] == 4096
    assert c["migration drop/hold_full"] == 0
    assert {k: v for k, v in c.items() if k.startswith("bus ") and "drop/" in k and v} == {}


def test_the_autoscaler_follows_offered_load_without_flapping(hosts):
    """Traffic starts: the manager adds a worker (the busy fraction over the policy's
    threshold for `sustain` seconds); traffic stops: it goes back to one. Exactly
    two decisions, each with its reason in `dva status`, and nothing lost."""
    lab, inside, outside, work, apps = hosts
    path = work / "hot.yaml"
    path.write_text(appliance_text(inside.outside, outside.outside, BASE_RULES, False))
    sock = str(work / "hot.sock")
    app = Appliance(path, work, ("--autoscale", "1:2", "--scale-policy",
                                 "out=0.01,in=0.002,sustain=2,hold=2", "--control", sock))
    apps.append(app)

    def workers_after(n: int, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = request(sock, {"op": "status"})["status"]
            if st["workers"] == n:
                return st
            time.sleep(0.2)
        raise AssertionError(f"still {st['workers']} workers: {st['decisions']}, "
                             f"{[u['busy_last_s'] for u in st['units']]}")

    time.sleep(3)
    assert request(sock, {"op": "status"})["status"]["workers"] == 1  # idle: stays
    traffic = Traffic(lab, inside, outside, work, rate=3000, echo=False)
    up = workers_after(2, 30)
    time.sleep(3)  # loaded on two workers: no scale-in while it lasts
    assert request(sock, {"op": "status"})["status"]["workers"] == 2
    sent, got, _ = traffic.finish()
    down = workers_after(1, 30)
    code, c, err = app.stop()
    assert code == 0, err
    lost = {p: sent[p] - got.get(p, (0, 0))[0] for p in sent}
    assert all(v == 0 for v in lost.values()), lost
    assert all(r == 0 for _, r in got.values())
    scaled = [d for d in down["decisions"] if "scaled" in d]
    assert len(scaled) == 2, down["decisions"]
    assert "scaled 1 -> 2" in scaled[0] and "mean busy" in scaled[0] and ">" in scaled[0]
    assert "scaled 2 -> 1" in scaled[1] and "mean busy" in scaled[1] and "<" in scaled[1]
    assert up["autoscale"]["max_workers"] == 2
    assert c["migration moves"] >= 2 and c["migration drop/hold_full"] == 0
