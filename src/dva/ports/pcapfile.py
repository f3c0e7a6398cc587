"""Read and write packet capture files (classic pcap and pcapng) of Ethernet frames.

Reading (:func:`read_frames`) accepts

* classic pcap with microsecond (``a1b2c3d4``) or nanosecond (``a1b23c4d``)
  timestamps, in either byte order;
* pcapng with any number of sections (each Section Header Block may switch
  byte order and starts a fresh interface list), Interface Description Blocks
  (``if_tsresol`` and ``if_tsoffset`` are honoured), Enhanced Packet Blocks,
  Simple Packet Blocks and the obsolete Packet Block.  All other block types
  (name resolution, statistics, decryption secrets, custom, ...) are skipped.

Frames are yielded lazily as ``(timestamp_seconds, frame_bytes)``, one record at
a time, so arbitrarily large files can be streamed.  Every malformed input
raises :class:`PcapError` whose message starts with the file name and gives the
byte offset of the offending structure.

Writing (:class:`PcapWriter`, :func:`write_frames`) always produces classic
little-endian, microsecond-resolution pcap (version 2.4) with link type
Ethernet.

Limits:

* Only Ethernet (link type 1) is supported.  In pcapng a non-Ethernet interface
  is only an error once a packet on it is met, so files that merely *declare*
  other interfaces still work.
* Timestamps are Python floats: around the present epoch they resolve to
  roughly 0.25 microseconds, so nanosecond timestamps lose their last digits.
* Records longer than 256 KiB are rejected as corrupt (classic pcap), and
  pcapng blocks that must be parsed are limited to 16 MiB, so a corrupt length
  field cannot make the reader allocate gigabytes.
* Per-packet options (comments, flags, hashes), name resolution and interface
  statistics are ignored; Simple Packet Blocks carry no timestamp and are
  reported with timestamp 0.0.
* The writer cannot represent timestamps before 1970 or after 2106.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Final

__all__ = [
    "LINKTYPE_ETHERNET",
    "PcapError",
    "PcapWriter",
    "read_frames",
    "write_frames",
]

_StrPath = str | os.PathLike[str]

LINKTYPE_ETHERNET: Final = 1

# Readable names for link types people commonly feed us by mistake.
_LINKTYPE_NAMES: Final[dict[int, str]] = {
    0: "BSD loopback",
    101: "raw IP",
    105: "IEEE 802.11",
    108: "OpenBSD loopback",
    113: "Linux cooked (SLL)",
    127: "IEEE 802.11 radiotap",
    147: "user-defined 0",
    228: "raw IPv4",
    229: "raw IPv6",
    276: "Linux cooked v2 (SLL2)",
}

# A caplen above this is far more likely a corrupt header than a real frame
# (it is also the largest snaplen tcpdump/Wireshark use for Ethernet).
_MAX_CAPLEN: Final = 256 * 1024
# Upper bound on pcapng blocks we read into memory (packet blocks may carry
# options on top of the frame, so this is more generous than _MAX_CAPLEN).
_MAX_PARSED_BLOCK: Final = 16 * 1024 * 1024
_SKIP_CHUNK: Final = 64 * 1024
_READ_BUFFER: Final = 256 * 1024

# Classic pcap: magic bytes as they appear on disk -> (struct byte order, timestamp
# fraction units per second).
_CLASSIC_MAGICS: Final[dict[bytes, tuple[str, int]]] = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
_CLASSIC_HEADER_LEN: Final = 24
_CLASSIC_RECORD_LEN: Final = 16

# pcapng block types.  The SHB type is a byte palindrome so it can be
# recognised before the byte order is known.
_SHB_TYPE_BYTES: Final = b"\x0a\x0d\x0d\x0a"
_BT_SHB: Final = 0x0A0D0D0A
_BT_IDB: Final = 0x00000001
_BT_PB: Final = 0x00000002
_BT_SPB: Final = 0x00000003
_BT_EPB: Final = 0x00000006
_PARSED_BLOCKS: Final = frozenset({_BT_SHB, _BT_IDB, _BT_PB, _BT_SPB, _BT_EPB})
_BYTE_ORDER_MAGICS: Final[dict[bytes, str]] = {
    b"\x4d\x3c\x2b\x1a": "<",
    b"\x1a\x2b\x3c\x4d": ">",
}
_OPT_ENDOFOPT: Final = 0
_OPT_IF_TSRESOL: Final = 9
_OPT_IF_TSOFFSET: Final = 14

_WRITER_MAGIC: Final = 0xA1B2C3D4
_WRITER_HEADER: Final = struct.Struct("<IHHiIII")
_WRITER_RECORD: Final = struct.Struct("<IIII")


class PcapError(Exception):
    """A capture file is missing, unreadable, malformed or unsupported."""


def _linktype_text(linktype: int) -> str:
    name = _LINKTYPE_NAMES.get(linktype)
    return f"link type {linktype} ({name})" if name else f"link type {linktype}"


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class _Source:
    """Sequential reader over a binary file that tracks the byte offset.

    Bytes consumed while sniffing the format can be pushed back, which keeps
    the reader usable on non-seekable files (pipes, /dev/stdin).
    """

    def __init__(self, fileobj: BinaryIO, name: str) -> None:
        self._file = fileobj
        self.name = name
        self.offset = 0
        self._pending = b""

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending
        self.offset -= len(data)

    def read_upto(self, n: int) -> bytes:
        """Read at most ``n`` bytes; fewer only at end of file."""
        if self._pending:
            data = self._pending[:n]
            self._pending = self._pending[n:]
            if len(data) < n:
                data += self._read_file(n - len(data))
        else:
            data = self._read_file(n)
        self.offset += len(data)
        return data

    def _read_file(self, n: int) -> bytes:
        # A raw read may legitimately return short; loop until EOF or n bytes.
        chunks = []
        remaining = n
        while remaining > 0:
            chunk = self._file.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def read_exact(self, n: int, what: str, at: int | None = None) -> bytes:
        """Read exactly ``n`` bytes or raise a truncation error for ``what`` at ``at``."""
        start = self.offset
        data = self.read_upto(n)
        if len(data) < n:
            where = start if at is None else at
            raise self.error(
                f"truncated {what}", where, f"needs {n} bytes, {len(data)} left"
            )
        return data

    def skip_exact(self, n: int, what: str, at: int) -> None:
        """Discard ``n`` bytes in bounded chunks so huge skipped blocks cost no memory."""
        remaining = n
        while remaining > 0:
            got = len(self.read_upto(min(remaining, _SKIP_CHUNK)))
            if got == 0:
                raise self.error(
                    f"truncated {what}", at, f"needs {n} bytes, {n - remaining} left"
                )
            remaining -= got

    def error(self, what: str, at: int, detail: str = "") -> PcapError:
        suffix = f" ({detail})" if detail else ""
        return PcapError(f"{self.name}: {what} at byte {at}{suffix}")


def read_frames(path: _StrPath) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp_seconds, frame_bytes)`` for every packet in a classic
    pcap or pcapng file, in file order.

    The file is opened on the first ``next()`` and read one record at a time;
    it is closed when the generator is exhausted, closed or garbage collected.
    Any problem with the file (including failing to open it) raises
    :class:`PcapError`.
    """
    name = str(path)
    try:
        fileobj = open(path, "rb", buffering=_READ_BUFFER)
    except OSError as exc:
        raise PcapError(f"{name}: cannot open file at byte 0 ({exc})") from exc
    with fileobj:
        src = _Source(fileobj, name)
        try:
            magic = src.read_upto(4)
            if not magic:
                raise src.error("empty file, not a pcap or pcapng file", 0)
            if len(magic) < 4:
                raise src.error(
                    "truncated file header", 0, f"needs 4 bytes, {len(magic)} left"
                )
            src.unread(magic)
            if magic in _CLASSIC_MAGICS:
                byte_order, units_per_sec = _CLASSIC_MAGICS[magic]
                yield from _read_classic(src, byte_order, units_per_sec)
            elif magic == _SHB_TYPE_BYTES:
                yield from _read_pcapng(src)
            else:
                raise src.error(
                    f"not a pcap or pcapng file (magic {magic.hex()})", 0
                )
        except OSError as exc:
            raise src.error("I/O error", src.offset, str(exc)) from exc


def _read_classic(
    src: _Source, byte_order: str, units_per_sec: int
) -> Iterator[tuple[float, bytes]]:
    header = src.read_exact(_CLASSIC_HEADER_LEN, "pcap file header")
    # Compared in full on purpose: set top bits announce a trailing FCS on
    # every frame, which we would otherwise pass on as payload.
    (linktype,) = struct.unpack_from(byte_order + "I", header, 20)
    if linktype != LINKTYPE_ETHERNET:
        raise src.error(
            f"unsupported {_linktype_text(linktype)}, only Ethernet (1) is supported",
            20,
        )
    record = struct.Struct(byte_order + "IIII")
    while True:
        record_start = src.offset
        head = src.read_upto(_CLASSIC_RECORD_LEN)
        if not head:
            return
        if len(head) < _CLASSIC_RECORD_LEN:
            raise src.error(
                "truncated packet record header",
                record_start,
                f"needs {_CLASSIC_RECORD_LEN} bytes, {len(head)} left",
            )
        ts_sec, ts_frac, caplen, origlen = record.unpack(head)
        if caplen > origlen:
            raise src.error(
                f"packet record captured length {caplen} exceeds original length {origlen}",
                record_start,
            )
        if caplen > _MAX_CAPLEN:
            raise src.error(
                f"packet record captured length {caplen} exceeds sanity limit {_MAX_CAPLEN}",
                record_start,
            )
        frame = src.read_exact(caplen, "packet record data")
        yield ts_sec + ts_frac / units_per_sec, frame


@dataclass(frozen=True, slots=True)
class _Interface:
    linktype: int
    snaplen: int
    # Timestamp units per second: 10**n or 2**n from if_tsresol.
    units_per_sec: int
    # if_tsoffset: seconds added to every timestamp of this interface.
    ts_offset: int


def _read_pcapng(src: _Source) -> Iterator[tuple[float, bytes]]:
    byte_order = "<"
    interfaces: list[_Interface] = []
    while True:
        block_start = src.offset
        head = src.read_upto(8)
        if not head:
            return
        if len(head) < 8:
            raise src.error(
                "truncated block header", block_start, f"needs 8 bytes, {len(head)} left"
            )
        is_shb = head[:4] == _SHB_TYPE_BYTES
        if is_shb:
            # The byte order of the block length is only known after the magic.
            bom = src.read_exact(4, "section header block", block_start)
            if bom not in _BYTE_ORDER_MAGICS:
                raise src.error(
                    f"bad pcapng byte-order magic {bom.hex()}", block_start + 8
                )
            byte_order = _BYTE_ORDER_MAGICS[bom]
            interfaces = []
        block_type, total_len = struct.unpack(byte_order + "II", head)
        min_len = 28 if is_shb else 12
        if total_len < min_len or total_len % 4:
            raise src.error(
                f"bad block total length {total_len} for block type 0x{block_type:08x}"
                f" (must be a multiple of 4 and at least {min_len})",
                block_start,
            )
        body_len = total_len - 12
        what = f"block type 0x{block_type:08x}"
        if block_type in _PARSED_BLOCKS:
            if total_len > _MAX_PARSED_BLOCK:
                raise src.error(
                    f"{what} length {total_len} exceeds sanity limit {_MAX_PARSED_BLOCK}",
                    block_start,
                )
            # For the SHB the byte-order magic is already consumed.
            body = src.read_exact(
                body_len - 4 if is_shb else body_len, what, block_start
            )
        else:
            body = b""
            src.skip_exact(body_len, what, block_start)
        trailer = src.read_exact(4, f"{what} (trailing length)", block_start)
        (trailing_len,) = struct.unpack(byte_order + "I", trailer)
        if trailing_len != total_len:
            raise src.error(
                f"{what} trailing length {trailing_len} does not match leading length {total_len}",
                block_start,
            )

        if block_type == _BT_SHB:
            (major,) = struct.unpack_from(byte_order + "H", body, 0)
            if major != 1:
                raise src.error(f"unsupported pcapng major version {major}", block_start)
        elif block_type == _BT_IDB:
            interfaces.append(_parse_idb(src, body, byte_order, block_start))
        elif block_type == _BT_EPB:
            yield _parse_epb(src, body, byte_order, block_start, interfaces)
        elif block_type == _BT_PB:
            yield _parse_pb(src, body, byte_order, block_start, interfaces)
        elif block_type == _BT_SPB:
            yield _parse_spb(src, body, byte_order, block_start, interfaces)


def _parse_options(
    src: _Source, body: bytes, pos: int, byte_order: str, block_start: int
) -> dict[int, bytes]:
    """Return the first value of every option in ``body[pos:]``."""
    options: dict[int, bytes] = {}
    # Fewer than 4 trailing bytes cannot hold an option header; writers that
    # omit opt_endofopt end exactly at the block end, so tolerate the rest.
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(byte_order + "HH", body, pos)
        if code == _OPT_ENDOFOPT:
            break
        value_start = pos + 4
        if value_start + length > len(body):
            raise src.error(
                f"option {code} of length {length} overruns its block",
                block_start + 8 + pos,
            )
        options.setdefault(code, body[value_start : value_start + length])
        pos = value_start + _pad4(length)
    return options


def _parse_idb(
    src: _Source, body: bytes, byte_order: str, block_start: int
) -> _Interface:
    if len(body) < 8:
        raise src.error(
            f"interface description block too short ({len(body)} body bytes, needs 8)",
            block_start,
        )
    linktype, _reserved, snaplen = struct.unpack_from(byte_order + "HHI", body, 0)
    options = _parse_options(src, body, 8, byte_order, block_start)
    units_per_sec = 1_000_000
    tsresol = options.get(_OPT_IF_TSRESOL)
    if tsresol is not None:
        if len(tsresol) != 1:
            raise src.error(
                f"if_tsresol option has length {len(tsresol)}, expected 1", block_start
            )
        exponent = tsresol[0] & 0x7F
        units_per_sec = 2**exponent if tsresol[0] & 0x80 else 10**exponent
    ts_offset = 0
    tsoffset = options.get(_OPT_IF_TSOFFSET)
    if tsoffset is not None:
        if len(tsoffset) != 8:
            raise src.error(
                f"if_tsoffset option has length {len(tsoffset)}, expected 8", block_start
            )
        (ts_offset,) = struct.unpack(byte_order + "q", tsoffset)
    return _Interface(linktype, snaplen, units_per_sec, ts_offset)


def _ethernet_interface(
    src: _Source, interfaces: list[_Interface], interface_id: int, block_start: int
) -> _Interface:
    if interface_id >= len(interfaces):
        raise src.error(
            f"packet refers to interface {interface_id}, but the section defines only "
            f"{len(interfaces)} interface(s)",
            block_start,
        )
    interface = interfaces[interface_id]
    if interface.linktype != LINKTYPE_ETHERNET:
        raise src.error(
            f"packet on interface {interface_id} with unsupported "
            f"{_linktype_text(interface.linktype)}, only Ethernet (1) is supported",
            block_start,
        )
    return interface


def _packet_data(
    src: _Source, body: bytes, data_start: int, caplen: int, block_start: int
) -> bytes:
    # Packet data is padded to 4 bytes inside the block.
    if data_start + _pad4(caplen) > len(body):
        raise src.error(
            f"captured length {caplen} does not fit in its block "
            f"({len(body) - data_start} bytes available)",
            block_start,
        )
    return body[data_start : data_start + caplen]


def _parse_epb(
    src: _Source,
    body: bytes,
    byte_order: str,
    block_start: int,
    interfaces: list[_Interface],
) -> tuple[float, bytes]:
    if len(body) < 20:
        raise src.error(
            f"enhanced packet block too short ({len(body)} body bytes, needs 20)",
            block_start,
        )
    interface_id, ts_high, ts_low, caplen, _origlen = struct.unpack_from(
        byte_order + "IIIII", body, 0
    )
    interface = _ethernet_interface(src, interfaces, interface_id, block_start)
    frame = _packet_data(src, body, 20, caplen, block_start)
    return _timestamp(interface, ts_high, ts_low), frame


def _parse_pb(
    src: _Source,
    body: bytes,
    byte_order: str,
    block_start: int,
    interfaces: list[_Interface],
) -> tuple[float, bytes]:
    if len(body) < 20:
        raise src.error(
            f"packet block too short ({len(body)} body bytes, needs 20)", block_start
        )
    interface_id, _drops, ts_high, ts_low, caplen, _origlen = struct.unpack_from(
        byte_order + "HHIIII", body, 0
    )
    interface = _ethernet_interface(src, interfaces, interface_id, block_start)
    frame = _packet_data(src, body, 20, caplen, block_start)
    return _timestamp(interface, ts_high, ts_low), frame


def _parse_spb(
    src: _Source,
    body: bytes,
    byte_order: str,
    block_start: int,
    interfaces: list[_Interface],
) -> tuple[float, bytes]:
    if len(body) < 4:
        raise src.error(
            f"simple packet block too short ({len(body)} body bytes, needs 4)",
            block_start,
        )
    (origlen,) = struct.unpack_from(byte_order + "I", body, 0)
    interface = _ethernet_interface(src, interfaces, 0, block_start)
    # An SPB has no caplen field: the frame is the original length cut to the
    # interface snaplen (0 = unlimited) and to what the block can hold.
    caplen = origlen
    if interface.snaplen:
        caplen = min(caplen, interface.snaplen)
    caplen = min(caplen, len(body) - 4)
    return 0.0, body[4 : 4 + caplen]


def _timestamp(interface: _Interface, ts_high: int, ts_low: int) -> float:
    units = (ts_high << 32) | ts_low
    # int / int is correctly rounded even for huge 10**n divisors.
    return interface.ts_offset + units / interface.units_per_sec


class PcapWriter:
    """Write Ethernet frames to a classic little-endian microsecond pcap file.

    The global header is written when the writer is created.  Frames longer
    than ``snaplen`` are truncated to ``snaplen`` bytes; the record keeps the
    original length.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: _StrPath, snaplen: int = 262144) -> None:
        # Refuse snaplens our own reader would reject as corrupt.
        if not 0 < snaplen <= _MAX_CAPLEN:
            raise ValueError(f"snaplen must be between 1 and {_MAX_CAPLEN}, got {snaplen}")
        self.path = path
        self.snaplen = snaplen
        self._file: BinaryIO | None = open(path, "wb")
        try:
            self._file.write(
                _WRITER_HEADER.pack(_WRITER_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)
            )
        except BaseException:
            self._file.close()
            self._file = None
            raise

    def write(self, ts: float, frame: bytes) -> None:
        """Append one frame captured at ``ts`` seconds since the epoch."""
        if self._file is None:
            raise ValueError(f"{self.path}: write to a closed PcapWriter")
        # Checked before scaling so huge values cannot overflow round().
        if not (math.isfinite(ts) and 0 <= ts < 2**32):
            raise ValueError(f"timestamp {ts!r} is outside the pcap range (1970..2106)")
        # Round rather than truncate so that values read back from a pcap
        # (sec + usec/1e6, slightly inexact as floats) reproduce the same usec.
        seconds, micros = divmod(round(ts * 1_000_000), 1_000_000)
        if not 0 <= seconds <= 0xFFFFFFFF:
            raise ValueError(f"timestamp {ts!r} is outside the pcap range (1970..2106)")
        data = bytes(frame)
        origlen = len(data)
        if origlen > 0xFFFFFFFF:
            raise ValueError(f"frame of {origlen} bytes is too long for pcap")
        caplen = min(origlen, self.snaplen)
        self._file.write(_WRITER_RECORD.pack(seconds, micros, caplen, origlen))
        self._file.write(data[:caplen])

    def close(self) -> None:
        """Flush and close the file; calling it again does nothing."""
        if self._file is not None:
            fileobj, self._file = self._file, None
            fileobj.close()

    @property
    def closed(self) -> bool:
        return self._file is None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_frames(path: _StrPath, frames: Iterable[tuple[float, bytes]]) -> int:
    """Write ``(timestamp_seconds, frame_bytes)`` pairs to a new classic pcap file.

    Returns the number of frames written.
    """
    count = 0
    with PcapWriter(path) as writer:
        for ts, frame in frames:
            writer.write(ts, frame)
            count += 1
    return count
