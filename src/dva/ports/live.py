"""Live port attachments: frames to and from Linux network interfaces.

Two kinds, one interface (:class:`LivePort`): ``recv`` appends received frames to a
:class:`~dva.packet.batch.PacketBatch` (copied into fresh pool slots at the
headroom, rows initialised like ``PacketBatch.add_frame``), ``send`` transmits the
rows of a batch without releasing their slots, ``fileno`` is for ``select.poll``.
Nothing blocks. Every frame a port loses is counted by name in ``drops``:

* ``too_long`` -- a received frame does not fit a pool slot (``pool.max_frame``), or
  the kernel truncated it (``tp_snaplen < tp_len``);
* ``pool_exhausted`` -- no free slot for a received frame (the frame is dropped);
* ``tx_too_long`` -- a frame to send is longer than MTU + 18 (header and one tag);
* ``tx_ring_full`` -- the TX ring stayed full for ``tx_wait`` seconds (no frame
  completed meanwhile); the rest of the batch is not sent;
* ``tx_error`` -- the kernel refused a transmit (EAGAIN, ENOBUFS, ...): for the TX
  ring one count per failed kick (the frames stay queued and go with the next
  kick), for a tap one per frame lost;
* ``link_down`` -- frames not sent because the interface was administratively down;
* ``kernel_drops`` -- frames the kernel dropped before we saw them (AF_PACKET:
  ``PACKET_STATISTICS`` ``tp_drops``; tap: growth of the interface's ``tx_dropped``),
  accumulated by :meth:`LivePort.kernel_stats`.

``rx`` and ``tx`` count frames received into batches and handed to the kernel.

AfPacketPort
------------
One ``AF_PACKET``/``SOCK_RAW`` socket, ``TPACKET_V3``, bound to the interface (the
socket is created with protocol 0 and bound with ``ETH_P_ALL`` only after its rings
exist, so it never queues frames of other interfaces), promiscuous
(``PACKET_MR_PROMISC``), with ``PACKET_IGNORE_OUTGOING`` (frames this host transmits
on the interface, ours included, are not received; kernels older than 4.20 lack the
option, and then the RX kernel skips ``sll_pkttype == PACKET_OUTGOING`` itself).

Ring geometry (one ``mmap`` holding the RX ring then the TX ring):

* RX: ``block_count`` blocks of ``block_size`` bytes (default 64 x 256 KiB = 16 MiB),
  ``tp_frame_size`` 2048 (only used to compute ``tp_frame_nr``: V3 packs frames of
  any size into a block), ``tp_retire_blk_tov = frame_timeout_ms``: a block that is
  not full is handed to us after that long, which bounds the receive latency at low
  rates. :func:`rx_ring_recv` (a numba kernel) walks the ready blocks
  (``block_status & TP_STATUS_USER``) packet by packet through ``tp_next_offset``,
  copies each frame into a new pool slot, and hands a block back
  (``TP_STATUS_KERNEL``) once all its packets are consumed; when ``max_n`` stops it
  inside a block a cursor (block, packet index, offset) resumes there next call.
  The kernel strips the outermost 802.1Q/802.1ad tag into ``tp_vlan_tci`` /
  ``tp_vlan_tpid``; it is put back after the MAC addresses, so the data plane sees
  the frame as it was on the wire.
* TX: ``TPACKET_V3`` TX ring of fixed frames (``tpacket3_hdr``, data at offset 48):
  2048-byte frames (4096 or 16384 for jumbo MTUs), ``tx_frames`` of them (default
  1024). :func:`tx_ring_fill` (a numba kernel) copies the batch's frames into
  ``TP_STATUS_AVAILABLE`` frames and marks them ``TP_STATUS_SEND_REQUEST``; one
  ``send(b"", MSG_DONTWAIT)`` then kicks the kernel to transmit all of them. If the
  ring is full, the port kicks and waits (``poll`` for ``POLLOUT``) for the kernel to
  complete frames; after ``tx_wait`` seconds (default 10 ms) without a free frame
  it counts the rest ``tx_ring_full``.
  ``PACKET_LOSS`` is set so that a frame the kernel finds malformed is skipped
  rather than stalling the ring. ``tx`` counts frames queued and kicked; a frame the
  qdisc or the driver drops afterwards is not visible here.

Link state (AF_PACKET): opening a *down* interface succeeds (a data plane may start
before its links come up); ``open_warning`` says so, ``is_up()`` tells, and frames
flow once it comes up (the kernel re-arms the socket on ``NETDEV_UP``). While it is
down ``recv`` returns 0 and ``send`` counts ``link_down``; neither raises. When the
interface is deleted, ``send`` and ``recv`` raise :class:`PortError`. ``recv``
notices it from the socket error the kernel posts (which also makes ``poll`` report
``POLLERR``) and from a check of the interface index while the link is down, so a
caller should call ``recv`` at least on every ``poll`` wake-up or timeout.

Limits: the ring is read without locks and relies on the full memory fences (``fence seq_cst``)
emitted around the block and frame status words; frames larger than a pool slot
(e.g. GRO/LRO aggregates on a physical NIC, or TSO super-frames that a local sender
pushes through a veth) are counted ``too_long``: turn those offloads off on the
interfaces a data plane owns (``ethtool -K IF gro off lro off``; on a veth's peer
``tso off gso off``). Frames whose checksum the sender left to offload
(``TP_STATUS_CSUMNOTREADY``) are delivered as they are and counted in
``rx_csum_partial``. The TX size limit uses the MTU read at open time.

TapPort
-------
``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI``, non-blocking; creates the tap when it
does not exist (a tap created so disappears when the port is closed) and brings it up.
``recv`` reads frame by frame straight into pool slots (``readv`` with an overflow
buffer to detect frames larger than a slot) until ``EAGAIN`` or ``max_n``; ``send``
writes frame by frame. The tap's side of the kernel delivers VLAN tags inline.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import time

import numpy as np

from dva._jit import JIT_ENABLED, i64, kernel
from dva.packet import layout as L
from dva.packet.batch import PacketBatch
from dva.packet.pool import pool_alloc
from dva.ports.offline import PortError

# --- linux/if_packet.h, linux/if_ether.h, linux/if.h, linux/sockios.h -------------
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
TPACKET_V3 = 2

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_CSUMNOTREADY = 0x8
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1

# struct tpacket_block_desc (version, offset_to_priv, tpacket_hdr_v1 ...)
BD_STATUS = 8
BD_NUM_PKTS = 12
BD_FIRST = 16
# struct tpacket3_hdr
H3_NEXT = 0
H3_SNAPLEN = 12
H3_LEN = 16
H3_STATUS = 20
H3_MAC = 24
H3_VLAN_TCI = 32
H3_VLAN_TPID = 36
H3_SIZE = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
SLL_PKTTYPE = H3_SIZE + 10  # struct sockaddr_ll follows the aligned header
TX_DATA = H3_SIZE  # TPACKET3_HDRLEN - sizeof(struct sockaddr_ll)

RX_FRAME_SIZE = 2048
ETH_OVERHEAD = 18  # Ethernet header + one VLAN tag on top of the MTU

IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
TUNSETIFF = 0x400454CA

# kernel counter slots shared by the RX/TX kernels
C_TOO_LONG = 0
C_POOL_EXHAUSTED = 1
C_OUTGOING = 2
C_CSUM_PARTIAL = 3
C_TX_TOO_LONG = 4
NCOUNTERS = 5

DROP_NAMES = ("too_long", "pool_exhausted", "tx_too_long", "tx_ring_full", "tx_error",
              "link_down", "kernel_drops")


# --- memory fences ------------------------------------------------------------------
if JIT_ENABLED:
    from numba import types
    from numba.core.extending import intrinsic

    @intrinsic
    def fence(typingctx):
        """A sequentially consistent fence: orders the ring's status words against
        the frame bytes for the compiler and the CPU."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return sig, codegen
else:
    def fence():
        """Python reference: the interpreter's own ordering is enough."""


# --- kernels --------------------------------------------------------------------------
@kernel
def rd_u32le(buf, o):
    return i64(buf[o]) | (i64(buf[o + 1]) << 8) | (i64(buf[o + 2]) << 16) | (i64(buf[o + 3]) << 24)


@kernel
def rd_u16le(buf, o):
    return i64(buf[o]) | (i64(buf[o + 1]) << 8)


@kernel
def rx_ring_recv(ring, st, blk_size, nblocks, data, free, top, headroom, max_frame,
                 meta, row0, max_n, in_port, tenant, origin, cnt):
    """Copy up to ``max_n`` frames from the TPACKET_V3 RX ring into pool slots.

    ``st`` is the cursor: [block, packet index in block, packet offset in block].
    Rows ``row0 ..`` of ``meta`` are written (the caller made room for ``max_n``).
    Returns how many rows were written; losses are added to ``cnt``.
    """
    n = 0
    while n < max_n:
        b = i64(st[0])
        base = b * blk_size
        if (rd_u32le(ring, base + BD_STATUS) & TP_STATUS_USER) == 0:
            break
        fence()
        num = rd_u32le(ring, base + BD_NUM_PKTS)
        idx = i64(st[1])
        off = i64(st[2])
        if idx == 0:
            off = rd_u32le(ring, base + BD_FIRST)
        while idx < num and n < max_n:
            h = base + off
            nxt = rd_u32le(ring, h + H3_NEXT)
            snap = rd_u32le(ring, h + H3_SNAPLEN)
            wire = rd_u32le(ring, h + H3_LEN)
            status = rd_u32le(ring, h + H3_STATUS)
            mac = rd_u16le(ring, h + H3_MAC)
            ptype = i64(ring[h + SLL_PKTTYPE])
            idx += 1
            off += nxt
            if ptype == PACKET_OUTGOING:
                cnt[C_OUTGOING] += 1
                continue
            if (status & TP_STATUS_CSUMNOTREADY) != 0:
                cnt[C_CSUM_PARTIAL] += 1
            tagged = (status & TP_STATUS_VLAN_VALID) != 0
            flen = snap + 4 if tagged else snap
            if snap < wire or flen > max_frame:
                cnt[C_TOO_LONG] += 1
                continue
            s = pool_alloc(free, top)
            if s < 0:
                cnt[C_POOL_EXHAUSTED] += 1
                continue
            src = h + mac
            if tagged and snap >= 12:
                tci = rd_u32le(ring, h + H3_VLAN_TCI) & 0xFFFF
                tpid = 0x8100
                if (status & TP_STATUS_VLAN_TPID_VALID) != 0:
                    tpid = rd_u16le(ring, h + H3_VLAN_TPID)
                for k in range(12):
                    data[s, headroom + k] = ring[src + k]
                data[s, headroom + 12] = (tpid >> 8) & 0xFF
                data[s, headroom + 13] = tpid & 0xFF
                data[s, headroom + 14] = (tci >> 8) & 0xFF
                data[s, headroom + 15] = tci & 0xFF
                d = headroom + 16
                for k in range(12, snap):
                    data[s, d + k - 12] = ring[src + k]
            else:
                flen = snap
                for k in range(snap):
                    data[s, headroom + k] = ring[src + k]
            r = row0 + n
            for f in range(L.NFIELDS):
                meta[r, f] = 0
            meta[r, L.SLOT] = s
            meta[r, L.START] = headroom
            meta[r, L.LEN] = flen
            meta[r, L.IN_PORT] = in_port
            meta[r, L.TENANT] = tenant
            meta[r, L.ORIGIN] = origin
            meta[r, L.VLAN] = -1
            n += 1
        if idx >= num:
            fence()  # done reading the block before the kernel may refill it
            ring[base + BD_STATUS + 3] = 0
            ring[base + BD_STATUS + 2] = 0
            ring[base + BD_STATUS + 1] = 0
            ring[base + BD_STATUS] = TP_STATUS_KERNEL
            nb = b + 1
            if nb == nblocks:
                nb = 0
            st[0] = nb
            st[1] = 0
            st[2] = 0
        else:
            st[1] = idx
            st[2] = off
    return n


@kernel
def tx_ring_fill(ring, tx_off, frame_size, nframes, st, data, meta, r0, r1, max_len,
                 cnt):
    """Queue rows ``r0 .. r1-1`` into the TX ring from cursor ``st[0]``.

    Returns the first row not handled (``r1`` unless the ring filled up); ``st[1]``
    is set to the number of frames queued. Rows longer than ``max_len`` are counted
    in ``cnt[C_TX_TOO_LONG]`` and skipped.
    """
    cur = i64(st[0])
    queued = 0
    r = r0
    while r < r1:
        ln = i64(meta[r, L.LEN])
        if ln > max_len or ln < 0:
            cnt[C_TX_TOO_LONG] += 1
            r += 1
            continue
        fr = tx_off + cur * frame_size
        if rd_u32le(ring, fr + H3_STATUS) != TP_STATUS_AVAILABLE:
            break
        fence()
        s = i64(meta[r, L.SLOT])
        a = i64(meta[r, L.START])
        d = fr + TX_DATA
        for k in range(ln):
            ring[d + k] = data[s, a + k]
        for k in range(H3_STATUS):  # tp_next_offset 0, tp_snaplen = tp_len = ln
            ring[fr + k] = 0
        for k in range(4):
            ring[fr + H3_SNAPLEN + k] = (ln >> (8 * k)) & 0xFF
            ring[fr + H3_LEN + k] = (ln >> (8 * k)) & 0xFF
        fence()  # frame complete before the kernel may see SEND_REQUEST
        ring[fr + H3_STATUS] = TP_STATUS_SEND_REQUEST
        queued += 1
        cur += 1
        if cur == nframes:
            cur = 0
        r += 1
    st[0] = cur
    st[1] = queued
    return r


@kernel
def tx_ring_reclaim(ring, tx_off, frame_size, nframes, st):
    """Take back frames still waiting for SEND_REQUEST behind the cursor (the kernel
    refused the kick before touching them); the cursor moves back to the first one,
    which is where the kernel's head is. Returns how many were taken back."""
    cur = i64(st[0])
    n = 0
    while n < nframes:
        p = cur - 1
        if p < 0:
            p = nframes - 1
        fr = tx_off + p * frame_size
        if rd_u32le(ring, fr + H3_STATUS) != TP_STATUS_SEND_REQUEST:
            break
        ring[fr + H3_STATUS] = TP_STATUS_AVAILABLE
        cur = p
        n += 1
    st[0] = cur
    return n


# --- helpers ------------------------------------------------------------------------
def _ifreq(ifname: str, fmt: str = "", *vals) -> bytes:
    name = ifname.encode()
    body = struct.pack(fmt, *vals) if fmt else b""
    return struct.pack("16s", name) + body + b"\0" * (24 - len(body))


def _if_flags(sock_fd: int, ifname: str) -> int | None:
    """Interface flags, or None when no interface has that name."""
    try:
        res = fcntl.ioctl(sock_fd, SIOCGIFFLAGS, _ifreq(ifname))
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            return None
        raise
    return struct.unpack_from("H", res, 16)[0]


def _if_mtu(sock_fd: int, ifname: str) -> int:
    try:
        res = fcntl.ioctl(sock_fd, SIOCGIFMTU, _ifreq(ifname))
    except OSError:
        return 1500
    return struct.unpack_from("i", res, 16)[0]


def _sys_counter(ifname: str, name: str) -> int:
    try:
        with open(f"/sys/class/net/{ifname}/statistics/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


class LivePort:
    """Common base of live ports: counters, close, the send/recv contract."""

    kind = "live"

    def __init__(self, ref: str, ifname: str) -> None:
        self.ref = ref
        self.ifname = ifname
        self.drops: dict[str, int] = dict.fromkeys(DROP_NAMES, 0)
        self.rx = 0
        self.tx = 0
        self.rx_csum_partial = 0  # frames delivered with CHECKSUM_PARTIAL (not drops)
        self.outgoing_skipped = 0  # PACKET_OUTGOING frames skipped (old kernels only)
        self.link_down_events = 0
        self.open_warning: str | None = None
        self._closed = False

    def _where(self) -> str:
        return f"{self.ref}: {self.kind} interface {self.ifname!r}"

    def fileno(self) -> int:
        raise NotImplementedError

    def recv(self, batch: PacketBatch, max_n: int, *, in_port: int = 0,
             tenant: int = 0, origin: int = -1) -> int:
        raise NotImplementedError

    def send(self, batch: PacketBatch) -> int:
        raise NotImplementedError

    def kernel_stats(self) -> dict[str, int]:
        return {}

    def warm(self, batch: PacketBatch) -> None:
        """Compile this port's kernels without moving a frame (before traffic
        starts, so the first frames do not wait for the compiler)."""

    def is_up(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise PortError(f"{self._where()}: port is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ref} on {self.ifname}>"


class AfPacketPort(LivePort):
    """TPACKET_V3 RX ring + TX ring on one AF_PACKET socket (see the module doc)."""

    kind = "af_packet"

    def __init__(self, ref: str, ifname: str, *, block_size: int = 1 << 18,
                 block_count: int = 64, frame_timeout_ms: int = 10,
                 tx_frames: int = 1024, tx_wait: float = 0.01) -> None:
        super().__init__(ref, ifname)
        page = mmap.PAGESIZE
        if block_size <= 0 or block_size % page or block_size % RX_FRAME_SIZE:
            raise PortError(f"{self._where()}: block_size {block_size} is not a "
                            f"multiple of the page size {page}")
        if block_count <= 0 or tx_frames <= 0 or frame_timeout_ms < 0:
            raise PortError(f"{self._where()}: bad ring geometry")
        self.tx_wait = tx_wait
        self._sock: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._ring = np.zeros(0, np.uint8)
        self._link_down = False
        self._last_link_check = 0.0
        self._cnt = np.zeros(NCOUNTERS, np.int64)
        self._rx_st = np.zeros(3, np.int64)
        self._tx_st = np.zeros(2, np.int64)
        if not ifname or len(ifname) > 15:
            raise PortError(f"{self._where()}: no such interface (bad name)")
        try:
            self.ifindex = socket.if_nametoindex(ifname)
        except OSError:
            raise PortError(f"{self._where()}: no such interface") from None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise PortError(f"{self._where()}: opening an AF_PACKET socket needs root "
                            "or CAP_NET_RAW") from None
        except OSError as e:
            raise PortError(f"{self._where()}: cannot open an AF_PACKET socket: "
                            f"{e.strerror}") from None
        self._sock = sock
        try:
            self._setup(sock, block_size, block_count, frame_timeout_ms, tx_frames)
        except BaseException:
            self.close()
            raise

    def _setup(self, sock, block_size, block_count, frame_timeout_ms, tx_frames) -> None:
        where = self._where()
        fd = sock.fileno()
        flags = _if_flags(fd, self.ifname)
        if flags is None:
            raise PortError(f"{where}: no such interface")
        self.mtu = _if_mtu(fd, self.ifname)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        except OSError as e:
            raise PortError(f"{where}: TPACKET_V3 not supported: {e.strerror}") from None
        try:
            sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        except OSError:
            pass
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.ignore_outgoing = True
        except OSError:  # Linux < 4.20: the RX kernel skips PACKET_OUTGOING frames
            self.ignore_outgoing = False
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                break
            except OSError:
                continue
        # RX ring
        self.block_size = block_size
        self.block_count = block_count
        rx_fnr = block_size // RX_FRAME_SIZE * block_count
        req = struct.pack("7I", block_size, block_count, RX_FRAME_SIZE, rx_fnr,
                          frame_timeout_ms, 0, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError as e:
            raise PortError(f"{where}: cannot set up the RX ring ({block_count} x "
                            f"{block_size} bytes): {e.strerror}") from None
        # TX ring: fixed frames large enough for MTU + header + tag
        need = self.mtu + ETH_OVERHEAD + TX_DATA
        fs = 2048
        while fs < need and fs < block_size:
            fs *= 2
        if fs < need:
            raise PortError(f"{where}: MTU {self.mtu} does not fit a TX frame of a "
                            f"{block_size}-byte block")
        per_block = block_size // fs
        tx_blocks = max(1, -(-tx_frames // per_block))
        self.tx_frame_size = fs
        self.tx_frame_count = per_block * tx_blocks
        req = struct.pack("7I", block_size, tx_blocks, fs, self.tx_frame_count, 0, 0, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
        except OSError as e:
            raise PortError(f"{where}: cannot set up the TX ring: {e.strerror}") from None
        self._tx_off = block_size * block_count
        self._tx_max = min(fs - TX_DATA, self.mtu + ETH_OVERHEAD)
        total = self._tx_off + block_size * tx_blocks
        try:
            self._mm = mmap.mmap(fd, total, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise PortError(f"{where}: cannot map the rings ({total} bytes): "
                            f"{e.strerror}") from None
        self._ring = np.frombuffer(self._mm, dtype=np.uint8)
        # Bind (this registers the ETH_P_ALL hook: frames start flowing), promiscuous.
        try:
            sock.bind((self.ifname, ETH_P_ALL))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise PortError(f"{where}: no such interface") from None
            raise PortError(f"{where}: cannot bind: {e.strerror}") from None
        mreq = struct.pack("iHH8s", self.ifindex, PACKET_MR_PROMISC, 0, b"")
        try:
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        except OSError as e:
            raise PortError(f"{where}: cannot enable promiscuous mode: "
                            f"{e.strerror}") from None
        sock.setblocking(False)
        if not flags & IFF_UP:
            self._link_down = True
            self.open_warning = (f"{where} is down; frames will flow once it is up "
                                 "(until then sends count drops['link_down'])")
        self.kernel_stats()  # start from zero

    # --- poll / state -------------------------------------------------------------
    def fileno(self) -> int:
        self._check_open()
        return self._sock.fileno()

    def is_up(self) -> bool:
        self._check_open()
        flags = _if_flags(self._sock.fileno(), self.ifname)
        return flags is not None and bool(flags & IFF_UP)

    def _gone(self) -> PortError:
        return PortError(f"{self._where()} was deleted")

    def _exists(self) -> bool:
        try:
            return socket.if_indextoname(self.ifindex) == self.ifname
        except OSError:
            return False

    def _idle_check(self) -> None:
        """Called when recv found nothing: consume a pending socket error (so poll
        stops reporting POLLERR), follow the link state, detect deletion."""
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        now = time.monotonic()
        if err:
            if not self._link_down:
                self.link_down_events += 1
            self._link_down = True
            self._last_link_check = 0.0
        if self._link_down and now - self._last_link_check >= 0.02:
            self._last_link_check = now
            if not self._exists():
                raise self._gone()
            flags = _if_flags(self._sock.fileno(), self.ifname)
            if flags is None:
                raise self._gone()
            if flags & IFF_UP:
                self._link_down = False

    def _sync_counters(self) -> None:
        c = self._cnt
        if c.any():
            self.drops["too_long"] += int(c[C_TOO_LONG])
            self.drops["pool_exhausted"] += int(c[C_POOL_EXHAUSTED])
            self.drops["tx_too_long"] += int(c[C_TX_TOO_LONG])
            self.rx_csum_partial += int(c[C_CSUM_PARTIAL])
            self.outgoing_skipped += int(c[C_OUTGOING])
            c[:] = 0

    # --- receive --------------------------------------------------------------------
    def recv(self, batch: PacketBatch, max_n: int, *, in_port: int = 0,
             tenant: int = 0, origin: int = -1) -> int:
        self._check_open()
        if max_n <= 0:
            return 0
        batch.ensure_capacity(batch.n + max_n)
        pool = batch.pool
        n = rx_ring_recv(self._ring, self._rx_st, self.block_size, self.block_count,
                         pool.data, pool.free, pool.top, pool.headroom, pool.max_frame,
                         batch.meta, batch.n, max_n, in_port, tenant, origin, self._cnt)
        batch.n += n
        self.rx += n
        self._sync_counters()
        if n == 0:
            self._idle_check()
        return n

    def warm(self, batch: PacketBatch) -> None:
        pool = batch.pool
        rx_ring_recv(self._ring, self._rx_st, self.block_size, self.block_count,
                     pool.data, pool.free, pool.top, pool.headroom, pool.max_frame,
                     batch.meta, batch.n, 0, 0, 0, -1, self._cnt)
        tx_ring_fill(self._ring, self._tx_off, self.tx_frame_size, self.tx_frame_count,
                     self._tx_st, pool.data, batch.meta, 0, 0, self._tx_max, self._cnt)

    # --- send -----------------------------------------------------------------------
    def _kick(self) -> bool:
        """Have the kernel transmit every SEND_REQUEST frame. False when the link is
        down (the frames were taken back and counted)."""
        try:
            self._sock.send(b"", socket.MSG_DONTWAIT)
            return True
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise self._gone() from None
            if e.errno == errno.ENETDOWN:
                if not self._exists():
                    raise self._gone() from None
                back = tx_ring_reclaim(self._ring, self._tx_off, self.tx_frame_size,
                                       self.tx_frame_count, self._tx_st)
                self.drops["link_down"] += back
                self.tx -= back
                if not self._link_down:
                    self.link_down_events += 1
                self._link_down = True
                return False
            self.drops["tx_error"] += 1  # EAGAIN, ENOBUFS, ...: frames stay queued
            return True

    def send(self, batch: PacketBatch) -> int:
        self._check_open()
        n = batch.n
        if n == 0:
            return 0
        pool = batch.pool
        before = self.tx
        r = 0
        deadline = 0.0
        while True:
            r = tx_ring_fill(self._ring, self._tx_off, self.tx_frame_size,
                             self.tx_frame_count, self._tx_st, pool.data, batch.meta,
                             r, n, self._tx_max, self._cnt)
            queued = int(self._tx_st[1])
            if queued:
                self.tx += queued
                if not self._kick():
                    # down: the rest would fail alike
                    self._sync_counters()
                    self.drops["link_down"] += n - r
                    break
                deadline = 0.0  # progress: the wait for a free frame starts afresh
            if r >= n:
                break
            now = time.monotonic()
            if deadline == 0.0:
                deadline = now + self.tx_wait
            if now >= deadline:
                self.drops["tx_ring_full"] += n - r
                break
            p = select.poll()
            p.register(self._sock.fileno(), select.POLLOUT)
            p.poll(max(1, int((deadline - now) * 1000)))
        self._sync_counters()
        return self.tx - before

    # --- statistics / close ---------------------------------------------------------
    def kernel_stats(self) -> dict[str, int]:
        """Read (and reset) PACKET_STATISTICS; tp_drops accumulate in
        drops['kernel_drops']. Returns this reading."""
        self._check_open()
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, freeze = struct.unpack("3I", raw)
        self.drops["kernel_drops"] += drops
        return {"packets": packets, "drops": drops, "freeze_q_cnt": freeze}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ring = np.zeros(0, np.uint8)  # drop the view before unmapping
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view escaped; the mapping goes with the process
                pass
            self._mm = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class TapPort(LivePort):
    """A tap interface through /dev/net/tun (IFF_TAP | IFF_NO_PI), non-blocking."""

    kind = "tap"

    def __init__(self, ref: str, ifname: str) -> None:
        super().__init__(ref, ifname)
        self._fd = -1
        self._ctl: socket.socket | None = None
        if not ifname or len(ifname) > 15:
            raise PortError(f"{self._where()}: bad interface name")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            raise PortError(f"{self._where()}: opening /dev/net/tun needs root or "
                            "CAP_NET_ADMIN") from None
        except FileNotFoundError:
            raise PortError(f"{self._where()}: /dev/net/tun does not exist "
                            "(tun module not loaded?)") from None
        self._fd = fd
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, "H", IFF_TAP | IFF_NO_PI))
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise PortError(f"{self._where()}: creating a tap needs root or "
                                    "CAP_NET_ADMIN") from None
                if e.errno in (errno.EINVAL, errno.EBUSY):
                    raise PortError(f"{self._where()}: cannot attach: the name is "
                                    f"taken by a non-tap interface or a busy tap "
                                    f"({e.strerror})") from None
                raise PortError(f"{self._where()}: TUNSETIFF failed: "
                                f"{e.strerror}") from None
            self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            flags = _if_flags(self._ctl.fileno(), ifname)
            if flags is not None and not flags & IFF_UP:
                try:
                    fcntl.ioctl(self._ctl.fileno(), SIOCSIFFLAGS,
                                _ifreq(ifname, "H", flags | IFF_UP))
                except OSError as e:
                    self.open_warning = f"{self._where()}: cannot bring it up: {e.strerror}"
            self.mtu = _if_mtu(self._ctl.fileno(), ifname)
            self._tx_max = self.mtu + ETH_OVERHEAD
            self._overflow = bytearray(65536)
            self._kdrops_base = _sys_counter(ifname, "tx_dropped")
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def is_up(self) -> bool:
        self._check_open()
        flags = _if_flags(self._ctl.fileno(), self.ifname)
        return flags is not None and bool(flags & IFF_UP)

    def _gone(self) -> PortError:
        return PortError(f"{self._where()} was deleted")

    def recv(self, batch: PacketBatch, max_n: int, *, in_port: int = 0,
             tenant: int = 0, origin: int = -1) -> int:
        self._check_open()
        if max_n <= 0:
            return 0
        pool = batch.pool
        batch.ensure_capacity(batch.n + max_n)
        h = pool.headroom
        maxf = pool.max_frame
        got = 0
        spare = -1  # a slot allocated but not filled (frame dropped)
        while got < max_n:
            if spare < 0:
                spare = pool.alloc() if pool.available else -1
            if spare < 0:
                # no slot: read the frame into the overflow buffer and drop it
                try:
                    k = os.readv(self._fd, [self._overflow])
                except BlockingIOError:
                    break
                except OSError as e:
                    self._read_error(e)
                    break
                if k <= 0:
                    break
                self.drops["pool_exhausted"] += 1
                continue
            view = memoryview(pool.data[spare, h:h + maxf])
            try:
                k = os.readv(self._fd, [view, self._overflow])
            except BlockingIOError:
                break
            except OSError as e:
                self._read_error(e)
                break
            finally:
                view.release()
            if k <= 0:
                break
            if k > maxf:
                self.drops["too_long"] += 1
                continue
            row = batch.meta[batch.n]
            row[:] = 0
            row[L.SLOT] = spare
            row[L.START] = h
            row[L.LEN] = k
            row[L.IN_PORT] = in_port
            row[L.TENANT] = tenant
            row[L.ORIGIN] = origin
            row[L.VLAN] = -1
            batch.n += 1
            spare = -1
            got += 1
        if spare >= 0:
            pool.release(spare)
        self.rx += got
        return got

    def _read_error(self, e: OSError) -> None:
        if e.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
            raise self._gone() from None
        if e.errno in (errno.EIO, errno.ENETDOWN):
            self.link_down_events += 1
            return
        raise PortError(f"{self._where()}: read failed: {e.strerror}") from None

    def send(self, batch: PacketBatch) -> int:
        self._check_open()
        data = batch.pool.data
        meta = batch.meta
        sent = 0
        for i in range(batch.n):
            s = int(meta[i, L.SLOT])
            a = int(meta[i, L.START])
            ln = int(meta[i, L.LEN])
            if ln > self._tx_max or ln < 0:
                self.drops["tx_too_long"] += 1
                continue
            view = memoryview(data[s, a:a + ln])
            try:
                os.write(self._fd, view)
                sent += 1
            except (BlockingIOError, InterruptedError):
                self.drops["tx_error"] += 1
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
                    raise self._gone() from None
                if e.errno in (errno.EIO, errno.ENETDOWN):
                    self.drops["link_down"] += 1
                else:
                    self.drops["tx_error"] += 1
            finally:
                view.release()
        self.tx += sent
        return sent

    def kernel_stats(self) -> dict[str, int]:
        """Frames the kernel dropped towards us (queue full): growth of the tap's
        tx_dropped since the last reading, accumulated in drops['kernel_drops']."""
        self._check_open()
        now = _sys_counter(self.ifname, "tx_dropped")
        d = max(0, now - self._kdrops_base)
        self._kdrops_base = now
        self.drops["kernel_drops"] += d
        return {"drops": d}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None


def open_live(ref: str, kind: str, ifname: str, **kw) -> LivePort:
    """Open a live attachment: ``kind`` is ``"af_packet"`` or ``"tap"``."""
    if kind == "af_packet":
        return AfPacketPort(ref, ifname, **kw)
    if kind == "tap":
        return TapPort(ref, ifname, **kw)
    raise PortError(f"{ref}: unknown live port kind {kind!r} (af_packet or tap)")


__all__ = ["AfPacketPort", "LivePort", "PortError", "TapPort", "open_live"]
