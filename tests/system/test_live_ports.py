"""Live ports against real interfaces: veth pairs with one end in a network namespace,
and a tap moved into a namespace.

Frames are sent and captured inside the namespace by small raw-socket scripts run
with ``ip netns exec`` (no scapy start-up cost); the capture puts stripped VLAN tags
back from PACKET_AUXDATA, so it sees frames as they were on the wire. Every frame a
test sends carries a per-test token, and tests look only at frames with it (the
kernel's own chatter is ignored). Needs root and ``ip netns``; everything created is
deleted in fixture finalizers, even on failure.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from dva.packet import layout as L
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.ports.live import (
    PACKET_IGNORE_OUTGOING,
    SOL_PACKET,
    AfPacketPort,
    PortError,
    TapPort,
    open_live,
)

pytestmark = pytest.mark.system

if os.geteuid() != 0:
    pytest.skip("live port tests need root", allow_module_level=True)

PID = os.getpid() % 10000
_seq = itertools.count()
ETYPE = 0x88B5  # IEEE local experimental ethertype
DST = bytes.fromhex("02dd00000001")
SRC = bytes.fromhex("02dd00000002")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r


@pytest.fixture(scope="module", autouse=True)
def _netns_available():
    probe = f"dvt{PID}probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if r.returncode != 0:
        pytest.skip("ip netns does not work here")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _no_ipv6(ns: str | None, ifname: str) -> None:
    """Keep IPv6 autoconfiguration chatter off the test links (best effort)."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if ns is None:
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError:
            pass
    else:
        sh("ip", "netns", "exec", ns, "sh", "-c", f"echo 1 > {path}", check=False)


@dataclass
class Veth:
    ns: str  # namespace holding the far end
    a: str  # near end, root namespace, up, no address
    b: str  # far end, inside ns, with an IPv4 address
    n: int


@pytest.fixture
def veth():
    n = next(_seq)
    v = Veth(f"dvt{PID}n{n}", f"dvt{PID}a{n}", f"dvt{PID}b{n}", n)
    try:
        sh("ip", "netns", "add", v.ns)
        sh("ip", "link", "add", v.a, "type", "veth", "peer", "name", v.b, "netns", v.ns)
        _no_ipv6(None, v.a)
        _no_ipv6(v.ns, v.b)
        sh("ip", "link", "set", v.a, "up")
        sh("ip", "-n", v.ns, "link", "set", "lo", "up")
        sh("ip", "-n", v.ns, "link", "set", v.b, "up")
        sh("ip", "-n", v.ns, "addr", "add", f"10.213.{n % 250}.2/24", "dev", v.b)
        yield v
    finally:
        subprocess.run(["ip", "link", "del", v.a], capture_output=True)
        subprocess.run(["ip", "netns", "del", v.ns], capture_output=True)


# --- frames and helpers ----------------------------------------------------------------
def token() -> bytes:
    return b"DVT" + struct.pack("!HI", PID, next(_seq))


def frame(tok: bytes, seq: int, length: int = 60, tags: tuple = ()) -> bytes:
    """A test frame: MACs, optional tags ((tpid, tci), ...), ETYPE, token, seq, pad."""
    hdr = DST + SRC + b"".join(struct.pack("!HH", tp, tci) for tp, tci in tags)
    body = struct.pack("!H", ETYPE) + tok + struct.pack("!I", seq)
    f = hdr + body
    return f + bytes((seq + i) & 0xFF for i in range(max(0, length - len(f))))


def seq_of(f: bytes) -> int:
    i = f.index(b"DVT")
    return struct.unpack_from("!I", f, i + 9)[0]


SENDER = r"""
import socket, sys, time
ifname, burst, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((ifname, 0))
for i, line in enumerate(sys.stdin):
    s.send(bytes.fromhex(line.strip()))
    if burst and (i + 1) % burst == 0:
        time.sleep(pause)
"""

CAPTURE = r"""
import socket, struct, sys, time
ifname, count, timeout, tok = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(263, 8, 1)  # PACKET_AUXDATA: tags the kernel stripped
for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE
    try:
        s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20); break
    except OSError:
        pass
s.bind((ifname, 3))
s.settimeout(0.1)
print("ready", flush=True)
got, end = 0, time.time() + timeout
while got < count and time.time() < end:
    try:
        data, anc, _, addr = s.recvmsg(65536, socket.CMSG_SPACE(32))
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    for level, typ, cd in anc:
        if level == 263 and typ == 8:
            st, _, _, _, _, tci, tpid = struct.unpack_from("IIIHHHH", cd)
            if st & 0x10:
                tp = tpid if st & 0x40 else 0x8100
                data = data[:12] + struct.pack("!HH", tp, tci) + data[12:]
    if tok in data:
        print(data.hex(), flush=True)
        got += 1
"""


def send_from_ns(v: Veth, frames: list[bytes], burst: int = 50, pause: float = 0.002,
                 wait: bool = True):
    cmd = ["ip", "netns", "exec", v.ns, sys.executable, "-c", SENDER, v.b, str(burst),
           str(pause)]
    data = "".join(f.hex() + "\n" for f in frames)
    if wait:
        r = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return None
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    p.stdin.write(data)
    p.stdin.close()
    return p


def start_capture(v: Veth, tok: bytes, count: int, timeout: float = 5.0):
    p = subprocess.Popen(["ip", "netns", "exec", v.ns, sys.executable, "-c", CAPTURE, v.b,
                          str(count), str(timeout), tok.hex()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()
    return p


def finish_capture(p) -> list[bytes]:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return [bytes.fromhex(x) for x in out.split()]


def drain(port, batch: PacketBatch, tok: bytes, until, timeout: float = 5.0,
          max_n=(256,)) -> list[bytes]:
    """recv (cycling through ``max_n`` values) until ``until(frames)`` or timeout; returns
    the frames carrying ``tok`` in arrival order and releases every slot."""
    poller = select.poll()
    poller.register(port.fileno(), select.POLLIN)
    got: list[bytes] = []
    sizes = itertools.cycle(max_n)
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(got):
        poller.poll(20)
        k = port.recv(batch, next(sizes))
        if k:
            got += [f for f in batch.frames() if tok in f]
            batch.release_all()
    return got


# --- AfPacketPort -------------------------------------------------------------------
def test_recv_exact_bytes_vlan_reinserted(veth):
    pool = PacketPool(1024)
    batch = PacketBatch(pool, 16)
    tok = token()
    sent = [
        frame(tok, 0, 60),
        frame(tok, 1, 1514),
        frame(tok, 2, 64, tags=((0x8100, 0xA064),)),  # PCP 5, VID 100
        frame(tok, 3, 1518, tags=((0x8100, 7),)),
        frame(tok, 4, 90, tags=((0x88A8, 300), (0x8100, 42))),  # QinQ: outer restored
        frame(tok, 5, 30),  # shorter than the Ethernet minimum
    ]
    with AfPacketPort("uplink", veth.a) as port:
        assert port.open_warning is None and port.is_up()
        send_from_ns(veth, sent)
        poller = select.poll()
        poller.register(port.fileno(), select.POLLIN)
        assert poller.poll(2000), "ring never became readable"
        rows = []
        end = time.monotonic() + 5
        while len(rows) < len(sent) and time.monotonic() < end:
            poller.poll(20)
            i0 = batch.n
            k = port.recv(batch, 64, in_port=3, tenant=7)
            rows += [i for i in range(i0, i0 + k) if tok in batch.frame(i)]
        got = [batch.frame(i) for i in rows]
        assert got == sent
        for i in rows:
            m = batch.meta[i]
            assert m[L.START] == pool.headroom and m[L.IN_PORT] == 3 and m[L.TENANT] == 7
            assert m[L.VLAN] == -1 and m[L.ORIGIN] == -1 and m[L.HOPS] == 0
        assert all(v == 0 for v in port.drops.values()), port.drops
        assert port.rx == batch.n
        batch.release_all()
    assert pool.available == pool.nslots


def test_recv_many_frames_none_lost(veth):
    pool = PacketPool(4096)
    batch = PacketBatch(pool, 256)
    tok = token()
    n = 2000
    sent = [frame(tok, i, 60 + (i * 37) % 900,
                  tags=((0x8100, i % 4095),) if i % 5 == 0 else ()) for i in range(n)]
    # small blocks so that 2000 frames span many blocks, and max_n values that stop
    # the walk in the middle of blocks
    with AfPacketPort("uplink", veth.a, block_size=1 << 16, block_count=64) as port:
        send_from_ns(veth, sent, burst=50, pause=0.002)
        got = drain(port, batch, tok, lambda g: len(g) >= n, max_n=(7, 256, 1, 33))
        assert len(got) == n
        assert [seq_of(f) for f in got] == list(range(n))
        assert got == sent
        stats = port.kernel_stats()
        assert stats["drops"] == 0 and port.drops["kernel_drops"] == 0
        assert port.drops["too_long"] == 0 and port.drops["pool_exhausted"] == 0
        assert port.rx >= n
    assert pool.available == pool.nslots


def test_recv_counts_too_long_and_pool_exhausted(veth):
    pool = PacketPool(4, slot_size=512, headroom=128)  # frames up to 384 bytes, 4 slots
    batch = PacketBatch(pool, 16)
    tok = token()
    small = [frame(tok, i, 100) for i in range(6)]
    sent = small[:3] + [frame(tok, 99, 500)] + small[3:]
    with AfPacketPort("uplink", veth.a) as port:
        send_from_ns(veth, sent)
        poller = select.poll()
        poller.register(port.fileno(), select.POLLIN)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            poller.poll(20)
            port.recv(batch, 16)
            d = port.drops
            if d["too_long"] + d["pool_exhausted"] + batch.n >= len(sent):
                break
        assert [batch.frame(i) for i in range(batch.n)] == small[:4]
        assert port.drops["too_long"] == 1
        assert port.drops["pool_exhausted"] == 2
        batch.release_all()
    assert pool.available == 4


def test_send_arrives_byte_exact(veth):
    pool = PacketPool(1024)
    batch = PacketBatch(pool, 512)
    tok = token()
    n = 300
    frames = [frame(tok, i, 60 + (i * 53) % 1455,
                    tags=((0x8100, 0x2000 | i),) if i % 7 == 0 else ()) for i in range(n)]
    frames[1] = frame(tok, 1, 1518, tags=((0x8100, 9),))  # MTU + header + tag
    for f in frames:
        batch.add_frame(f)
    batch.add_frame(frame(tok, 10_000, 1600))  # longer than MTU + 18: not sent
    # a TX ring smaller than the batch: the port must wrap and wait for completions
    with AfPacketPort("uplink", veth.a, tx_frames=64) as port:
        assert port.tx_frame_count < n
        cap = start_capture(veth, tok, n)
        assert port.send(batch) == n
        got = finish_capture(cap)
        assert port.tx == n
        assert port.drops["tx_too_long"] == 1
        assert port.drops["tx_ring_full"] == 0 and port.drops["tx_error"] == 0
        assert got == frames
        # send does not release slots
        assert pool.available == pool.nslots - batch.n
    batch.release_all()


def test_send_never_blocks_on_a_stuck_ring(veth):
    """A qdisc that holds frames keeps the TX ring full: send gives up after tx_wait
    and counts the rest instead of blocking."""
    r = sh("tc", "qdisc", "add", "dev", veth.a, "root", "tbf", "rate", "8kbit", "burst",
           "1600", "limit", "1000000", check=False)
    if r.returncode != 0:
        pytest.skip(f"tc tbf unavailable: {r.stderr.strip()}")
    pool = PacketPool(512)
    batch = PacketBatch(pool, 512)
    tok = token()
    for i in range(300):
        batch.add_frame(frame(tok, i, 100))
    with AfPacketPort("uplink", veth.a, tx_frames=64, tx_wait=0.01) as port:
        t0 = time.monotonic()
        sent = port.send(batch)
        elapsed = time.monotonic() - t0
        # the ring plus what the 1600-byte burst lets through at once
        assert port.tx_frame_count <= sent <= port.tx_frame_count + 1600 // 100 + 2
        assert port.drops["tx_ring_full"] == 300 - sent
        assert elapsed < 1.0
        sh("tc", "qdisc", "del", "dev", veth.a, "root")
    batch.release_all()


def test_own_and_host_transmits_not_received(veth):
    pool = PacketPool(1024)
    batch = PacketBatch(pool, 64)
    tok = token()
    out_port = [frame(tok, i, 80) for i in range(20)]
    out_host = [frame(tok, 100 + i, 80) for i in range(20)]
    control = frame(tok, 999, 80)
    import socket

    with AfPacketPort("uplink", veth.a) as port, \
            AfPacketPort("observer", veth.a) as observer:
        # the observer relies on the fallback: skip PACKET_OUTGOING in the ring
        observer._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 0)
        for f in out_port:
            batch.add_frame(f)
        assert port.send(batch) == len(out_port)
        batch.release_all()
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        host.bind((veth.a, 0))
        for f in out_host:
            host.send(f)
        host.close()
        send_from_ns(veth, [control])
        # anything looped back would be in the ring before the control frame
        for p in (port, observer):
            got = drain(p, batch, tok, lambda g: control in g, timeout=3)
            assert got == [control], [seq_of(f) for f in got]
        assert port.outgoing_skipped == 0  # the kernel filtered them for us
        assert observer.outgoing_skipped >= len(out_port) + len(out_host)
    assert pool.available == pool.nslots


def test_missing_interface_is_a_clear_error():
    with pytest.raises(PortError, match=r"uplink.*dvtnosuch0.*no such interface"):
        AfPacketPort("uplink", "dvtnosuch0")
    with pytest.raises(PortError, match=r"no such interface"):
        open_live("uplink", "af_packet", "dvtnosuch0")
    with pytest.raises(PortError, match=r"unknown live port kind"):
        open_live("uplink", "pcap", "lo")


def test_no_permission_is_a_clear_error():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    code = ("from dva.ports.live import AfPacketPort, PortError\n"
            "try:\n    AfPacketPort('uplink', 'lo')\n"
            "except PortError as e:\n    print(e)\n")
    r = subprocess.run(["setpriv", "--bounding-set", "-net_raw", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "uplink" in r.stdout and "'lo'" in r.stdout
    assert "needs root or CAP_NET_RAW" in r.stdout


def test_link_down_up_and_deleted(veth):
    pool = PacketPool(256)
    batch = PacketBatch(pool, 64)
    tok = token()
    port = AfPacketPort("uplink", veth.a)
    late = None
    try:
        sh("ip", "link", "set", veth.a, "down")
        assert not port.is_up()
        for _ in range(5):
            assert port.recv(batch, 16) == 0  # no raise while down
            time.sleep(0.01)
        assert port.link_down_events == 1
        for i in range(5):
            batch.add_frame(frame(tok, i, 80))
        assert port.send(batch) == 0
        assert port.drops["link_down"] == 5
        assert port.tx == 0
        # opening a down interface works, with a warning
        late = AfPacketPort("late", veth.a)
        assert late.open_warning and "down" in late.open_warning
        sh("ip", "link", "set", veth.a, "up")
        assert port.is_up()
        # the far end's qdisc comes back with the carrier (linkwatch): keep sending
        ctl = [frame(tok, 1000 + i, 80) for i in range(60)]
        sender = send_from_ns(veth, ctl, burst=1, pause=0.05, wait=False)
        try:
            for p in (port, late):
                got = drain(p, PacketBatch(pool, 64), tok, lambda g: len(g) > 0, timeout=5)
                assert got and seq_of(got[0]) >= 1000
        finally:
            sender.kill()
            sender.wait()
        # the TX ring recovered its frames: all five go out now
        assert port.send(batch) == 5 and port.tx == 5
        batch.release_all()
        sh("ip", "link", "del", veth.a)
        with pytest.raises(PortError, match=r"uplink.*deleted"):
            end = time.monotonic() + 2
            while time.monotonic() < end:
                port.recv(batch, 16)
                time.sleep(0.01)
        batch.add_frame(frame(tok, 5000, 80))
        with pytest.raises(PortError, match=r"deleted"):
            port.send(batch)
        batch.release_all()
    finally:
        port.close()
        port.close()  # idempotent
        if late is not None:
            late.close()
    with pytest.raises(PortError, match="closed"):
        port.recv(batch, 1)


# --- TapPort --------------------------------------------------------------------------
@dataclass
class Tap:
    ns: str
    name: str
    port: TapPort
    ip: str
    peer_ip: str


@pytest.fixture
def tap():
    n = next(_seq)
    ns, name = f"dvt{PID}n{n}", f"dvt{PID}t{n}"
    port = None
    try:
        sh("ip", "netns", "add", ns)
        port = TapPort("tap0", name)
        assert port.is_up()
        # the tap is created here and moved into the namespace: its fd stays ours
        sh("ip", "link", "set", name, "netns", ns)
        _no_ipv6(ns, name)
        sh("ip", "-n", ns, "link", "set", name, "up")
        ip, peer = f"10.214.{n % 250}.1", f"10.214.{n % 250}.2"
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", name)
        yield Tap(ns, name, port, ip, peer)
    finally:
        if port is not None:
            port.close()
        subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip4(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


def test_tap_receives_arp_and_sends_reply(tap):
    pool = PacketPool(64)
    batch = PacketBatch(pool, 16)
    out = sh("ip", "-n", tap.ns, "-o", "link", "show", tap.name).stdout
    tap_mac = bytes.fromhex(out.split("link/ether ")[1].split()[0].replace(":", ""))
    # make the kernel resolve the neighbour: it writes ARP requests into the tap
    sh("ip", "netns", "exec", tap.ns, sys.executable, "-c",
       "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
       f".sendto(b'x', ('{tap.peer_ip}', 9))")
    poller = select.poll()
    poller.register(tap.port.fileno(), select.POLLIN)
    req = None
    end = time.monotonic() + 4
    while req is None and time.monotonic() < end:
        poller.poll(50)
        tap.port.recv(batch, 16, in_port=2)
        for i in range(batch.n):
            f = batch.frame(i)
            if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01" and f[38:42] == _ip4(tap.peer_ip):
                req = f
                assert batch.meta[i, L.IN_PORT] == 2
        batch.release_all()
    assert req is not None, "no ARP request came out of the tap"
    assert req[0:6] == b"\xff" * 6 and req[6:12] == tap_mac
    assert req[28:32] == _ip4(tap.ip)
    assert tap.port.rx >= 1 and pool.available == pool.nslots

    peer_mac = bytes.fromhex("02dd0000aa%02x" % (PID % 256))
    reply = (tap_mac + peer_mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
             + peer_mac + _ip4(tap.peer_ip) + tap_mac + _ip4(tap.ip))
    reply += bytes(60 - len(reply))
    batch.add_frame(reply)
    batch.add_frame(bytes(2000))  # longer than MTU + 18
    assert tap.port.send(batch) == 1
    assert tap.port.drops["tx_too_long"] == 1 and tap.port.tx == 1
    batch.release_all()
    want = ":".join(f"{b:02x}" for b in peer_mac)
    end = time.monotonic() + 3
    neigh = ""
    while time.monotonic() < end:
        neigh = sh("ip", "-n", tap.ns, "neigh", "show", tap.peer_ip, "dev", tap.name).stdout
        if want in neigh:
            break
        time.sleep(0.05)
    assert f"lladdr {want}" in neigh, neigh
    assert tap.port.kernel_stats()["drops"] == 0
