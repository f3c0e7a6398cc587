"""Tests for dva.ports.pcapfile: classic pcap / pcapng reading and pcap writing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dva.ports.pcapfile import (
    LINKTYPE_ETHERNET,
    PcapError,
    PcapWriter,
    read_frames,
    write_frames,
)

# A few plausible Ethernet frames of different lengths (odd lengths exercise
# pcapng padding).
FRAME_A = bytes.fromhex("ffffffffffff0200000000010806") + bytes(range(28))
FRAME_B = bytes.fromhex("020000000002020000000001080045") + b"\xab" * 47
FRAME_C = b"\x01" * 60 + b"\x02"


# --------------------------------------------------------------------------
# Hand-built file builders
# --------------------------------------------------------------------------


def classic_pcap(
    records: list[tuple[int, int, bytes]],
    *,
    endian: str = "<",
    nanos: bool = False,
    linktype: int = LINKTYPE_ETHERNET,
) -> bytes:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data in records:
        out += struct.pack(endian + "IIII", sec, frac, len(data), len(data)) + data
    return out


def _pad(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def block(endian: str, block_type: int, body: bytes) -> bytes:
    body = _pad(body)
    total = 12 + len(body)
    return (
        struct.pack(endian + "II", block_type, total)
        + body
        + struct.pack(endian + "I", total)
    )


def option(endian: str, code: int, value: bytes) -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + _pad(value)


def end_of_options(endian: str) -> bytes:
    return struct.pack(endian + "HH", 0, 0)


def shb(endian: str) -> bytes:
    body = struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    return block(endian, 0x0A0D0D0A, body)


def idb(endian: str, linktype: int = LINKTYPE_ETHERNET, tsresol: int | None = None) -> bytes:
    body = struct.pack(endian + "HHI", linktype, 0, 0)
    if tsresol is not None:
        body += option(endian, 9, bytes([tsresol])) + end_of_options(endian)
    return block(endian, 1, body)


def epb(endian: str, interface: int, ticks: int, data: bytes) -> bytes:
    body = struct.pack(
        endian + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
    )
    return block(endian, 6, body + data)


def spb(endian: str, data: bytes) -> bytes:
    return block(endian, 3, struct.pack(endian + "I", len(data)) + data)


def write(tmp_path: Path, data: bytes, name: str = "in.pcap") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_all(path: Path) -> list[tuple[float, bytes]]:
    return list(read_frames(path))


# --------------------------------------------------------------------------
# Round trip and writer behaviour
# --------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    frames = [
        (1_700_000_000.123456, FRAME_A),
        (1_700_000_000.999999, FRAME_B),
        (1_700_000_001.000001, FRAME_C),
        (0.0, b""),
    ]
    path = tmp_path / "rt.pcap"
    assert write_frames(path, frames) == len(frames)
    got = read_all(path)
    assert [f for _, f in got] == [f for _, f in frames]
    for (ts_got, _), (ts_want, _) in zip(got, frames):
        assert ts_got == pytest.approx(ts_want, abs=1e-6)
    # Writing what we read reproduces the file byte for byte (usec rounding is stable).
    again = tmp_path / "again.pcap"
    write_frames(again, got)
    assert again.read_bytes() == path.read_bytes()


def test_writer_header_and_snaplen_truncation(tmp_path: Path) -> None:
    path = tmp_path / "snap.pcap"
    with PcapWriter(path, snaplen=16) as writer:
        writer.write(5.5, FRAME_A)
    data = path.read_bytes()
    assert struct.unpack_from("<IHHiIII", data, 0) == (0xA1B2C3D4, 2, 4, 0, 0, 16, 1)
    assert struct.unpack_from("<IIII", data, 24) == (5, 500_000, 16, len(FRAME_A))
    assert read_all(path) == [(5.5, FRAME_A[:16])]


def test_writer_close_is_idempotent_and_write_after_close_fails(tmp_path: Path) -> None:
    writer = PcapWriter(tmp_path / "c.pcap")
    writer.write(1.0, FRAME_A)
    writer.close()
    writer.close()
    with pytest.raises(ValueError):
        writer.write(2.0, FRAME_A)
    assert read_all(tmp_path / "c.pcap") == [(1.0, FRAME_A)]


def test_writer_rejects_unrepresentable_timestamps(tmp_path: Path) -> None:
    with PcapWriter(tmp_path / "t.pcap") as writer:
        for bad in (-1.0, float("nan"), float("inf"), 2.0**32, 1e308):
            with pytest.raises(ValueError):
                writer.write(bad, FRAME_A)


def test_read_frames_is_lazy_and_closes_file(tmp_path: Path) -> None:
    path = tmp_path / "lazy.pcap"
    write_frames(path, [(float(i), FRAME_A) for i in range(5)])
    gen = read_frames(path)
    assert next(gen) == (0.0, FRAME_A)
    gen.close()  # must not raise, file released
    # A missing file is reported as PcapError on first iteration.
    missing = read_frames(tmp_path / "missing.pcap")
    with pytest.raises(PcapError, match="missing.pcap"):
        next(missing)


# --------------------------------------------------------------------------
# Scapy interop
# --------------------------------------------------------------------------


def _scapy_packets() -> list:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    pkts = []
    # Binary fractions: exact in float, so scapy's truncating writer cannot drift.
    for i, ts in enumerate((1_700_000_000.5, 1_700_000_001.25, 1_700_000_002.0625)):
        pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(
            src="10.0.0.1", dst="10.0.0.2"
        ) / UDP(sport=1000 + i, dport=53) / (b"x" * (i * 7 + 1))
        pkt.time = ts
        pkts.append(pkt)
    return pkts


def test_reads_scapy_wrpcap(tmp_path: Path) -> None:
    from scapy.utils import wrpcap

    pkts = _scapy_packets()
    path = tmp_path / "scapy.pcap"
    wrpcap(str(path), pkts)
    got = read_all(path)
    assert [f for _, f in got] == [bytes(p) for p in pkts]
    for (ts, _), pkt in zip(got, pkts):
        assert ts == pytest.approx(float(pkt.time), abs=1e-6)


def test_reads_scapy_pcapng(tmp_path: Path) -> None:
    import scapy.utils

    if not hasattr(scapy.utils, "PcapNgWriter"):
        pytest.skip("scapy has no PcapNgWriter")
    pkts = _scapy_packets()
    path = tmp_path / "scapy.pcapng"
    with scapy.utils.PcapNgWriter(str(path)) as writer:
        for pkt in pkts:
            writer.write(pkt)
    got = read_all(path)
    assert [f for _, f in got] == [bytes(p) for p in pkts]
    for (ts, _), pkt in zip(got, pkts):
        assert ts == pytest.approx(float(pkt.time), abs=1e-6)


def test_scapy_reads_our_pcap(tmp_path: Path) -> None:
    from scapy.utils import rdpcap

    frames = [(1_700_000_000.123456, FRAME_A), (1_700_000_003.5, FRAME_B)]
    path = tmp_path / "ours.pcap"
    write_frames(path, frames)
    pkts = rdpcap(str(path))
    assert [bytes(p) for p in pkts] == [f for _, f in frames]
    for pkt, (ts, _) in zip(pkts, frames):
        assert float(pkt.time) == pytest.approx(ts, abs=1e-6)


# --------------------------------------------------------------------------
# Hand-built formats
# --------------------------------------------------------------------------


def test_big_endian_classic(tmp_path: Path) -> None:
    path = write(tmp_path, classic_pcap([(100, 250_000, FRAME_A), (101, 0, FRAME_B)], endian=">"))
    assert read_all(path) == [(100.25, FRAME_A), (101.0, FRAME_B)]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_nanosecond_classic(tmp_path: Path, endian: str) -> None:
    path = write(tmp_path, classic_pcap([(7, 123_456_789, FRAME_C)], endian=endian, nanos=True))
    [(ts, frame)] = read_all(path)
    assert frame == FRAME_C
    assert ts == pytest.approx(7.123456789, abs=1e-12)


def test_pcapng_big_endian(tmp_path: Path) -> None:
    e = ">"
    data = shb(e) + idb(e) + epb(e, 0, 1_700_000_000_250_000, FRAME_A) + epb(e, 0, 3_000_000, FRAME_C)
    got = read_all(write(tmp_path, data, "be.pcapng"))
    assert [f for _, f in got] == [FRAME_A, FRAME_C]
    assert got[0][0] == pytest.approx(1_700_000_000.25, abs=1e-6)
    assert got[1][0] == 3.0


def test_pcapng_tsresol_nanoseconds_and_power_of_two(tmp_path: Path) -> None:
    e = "<"
    data = (
        shb(e)
        + idb(e, tsresol=9)  # interface 0: 10^-9
        + idb(e, tsresol=0x80 | 10)  # interface 1: 2^-10
        + epb(e, 0, 1_700_000_000_123_456_789, FRAME_A)
        + epb(e, 1, 5 * 1024 + 512, FRAME_B)
    )
    got = read_all(write(tmp_path, data, "res.pcapng"))
    assert got[0][1] == FRAME_A
    assert got[0][0] == pytest.approx(1_700_000_000.123456789, abs=1e-6)
    assert got[1] == (5.5, FRAME_B)


def test_pcapng_two_sections_different_byte_orders(tmp_path: Path) -> None:
    data = (
        shb("<")
        + idb("<", tsresol=3)
        + epb("<", 0, 1500, FRAME_A)
        + shb(">")
        + idb(">")
        + epb(">", 0, 2_000_000, FRAME_B)
    )
    assert read_all(write(tmp_path, data, "two.pcapng")) == [(1.5, FRAME_A), (2.0, FRAME_B)]


def test_second_section_resets_interfaces(tmp_path: Path) -> None:
    data = shb("<") + idb("<") + epb("<", 0, 1, FRAME_A) + shb(">") + epb(">", 0, 1, FRAME_B)
    gen = read_frames(write(tmp_path, data, "reset.pcapng"))
    assert next(gen)[1] == FRAME_A
    with pytest.raises(PcapError, match="interface 0"):
        next(gen)


def test_pcapng_unknown_blocks_are_skipped(tmp_path: Path) -> None:
    e = "<"
    data = (
        shb(e)
        + block(e, 0x0BAD, b"\x00" * 40)  # unknown before any interface
        + idb(e)
        + block(e, 4, b"\x01\x00\x08\x00" + b"\x00" * 8)  # name resolution
        + epb(e, 0, 1_000_000, FRAME_A)
        + block(e, 5, b"\x00" * 12)  # interface statistics
        + block(e, 0x40000BAD, b"")  # empty custom block
    )
    assert read_all(write(tmp_path, data, "skip.pcapng")) == [(1.0, FRAME_A)]


def test_pcapng_simple_packet_block(tmp_path: Path) -> None:
    e = "<"
    data = shb(e) + idb(e) + spb(e, FRAME_C) + spb(e, FRAME_A)
    assert read_all(write(tmp_path, data, "spb.pcapng")) == [(0.0, FRAME_C), (0.0, FRAME_A)]


def test_pcapng_obsolete_packet_block(tmp_path: Path) -> None:
    e = ">"
    body = struct.pack(e + "HHIIII", 0, 0, 0, 2_500_000, len(FRAME_B), len(FRAME_B)) + FRAME_B
    data = shb(e) + idb(e) + block(e, 2, body)
    assert read_all(write(tmp_path, data, "pb.pcapng")) == [(2.5, FRAME_B)]


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _assert_error(path: Path, match: str) -> PcapError:
    with pytest.raises(PcapError) as info:
        read_all(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "at byte" in message
    assert match in message, message
    return info.value


def test_empty_file(tmp_path: Path) -> None:
    _assert_error(write(tmp_path, b""), "empty")


def test_garbage_header(tmp_path: Path) -> None:
    _assert_error(write(tmp_path, b"GIF89a garbage, not a capture"), "not a pcap or pcapng file")


def test_short_file(tmp_path: Path) -> None:
    _assert_error(write(tmp_path, b"\xd4\xc3"), "truncated")


def test_truncated_global_header(tmp_path: Path) -> None:
    _assert_error(write(tmp_path, classic_pcap([])[:20]), "truncated pcap file header")


@pytest.mark.parametrize(("linktype", "name"), [(101, "raw IP"), (113, "Linux cooked"), (127, "radiotap"), (9999, "9999")])
def test_classic_non_ethernet(tmp_path: Path, linktype: int, name: str) -> None:
    err = _assert_error(write(tmp_path, classic_pcap([(1, 0, FRAME_A)], linktype=linktype)), name)
    assert str(linktype) in str(err)


def test_pcapng_non_ethernet_interface(tmp_path: Path) -> None:
    e = "<"
    data = shb(e) + idb(e) + idb(e, linktype=113) + epb(e, 0, 0, FRAME_A) + epb(e, 1, 0, FRAME_B)
    path = write(tmp_path, data, "sll.pcapng")
    gen = read_frames(path)
    assert next(gen)[1] == FRAME_A  # declaring a foreign interface alone is fine
    with pytest.raises(PcapError) as info:
        next(gen)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "interface 1" in message and "113" in message and "Linux cooked" in message


def test_truncated_record_header(tmp_path: Path) -> None:
    good = classic_pcap([(1, 0, FRAME_A)])
    err = _assert_error(write(tmp_path, good + b"\x01\x00\x00\x00\x00"), "truncated packet record header")
    assert f"at byte {len(good)}" in str(err)
    assert "needs 16 bytes, 5 left" in str(err)


def test_truncated_record_data(tmp_path: Path) -> None:
    good = classic_pcap([(1, 0, FRAME_A), (2, 0, FRAME_B)])
    err = _assert_error(write(tmp_path, good[:-3]), "truncated packet record data")
    assert f"needs {len(FRAME_B)} bytes, {len(FRAME_B) - 3} left" in str(err)


def test_caplen_larger_than_origlen(tmp_path: Path) -> None:
    data = classic_pcap([]) + struct.pack("<IIII", 0, 0, 10, 5) + b"\x00" * 10
    _assert_error(write(tmp_path, data), "exceeds original length")


def test_caplen_over_sanity_limit(tmp_path: Path) -> None:
    data = classic_pcap([]) + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30)
    _assert_error(write(tmp_path, data), "sanity limit")


def test_pcapng_bad_trailing_length(tmp_path: Path) -> None:
    e = "<"
    bad = bytearray(epb(e, 0, 0, FRAME_A))
    bad[-4:] = struct.pack(e + "I", len(bad) + 4)
    prefix = shb(e) + idb(e)
    err = _assert_error(write(tmp_path, prefix + bytes(bad), "trail.pcapng"), "trailing length")
    assert f"at byte {len(prefix)}" in str(err)


@pytest.mark.parametrize("total", [8, 30])
def test_pcapng_bad_block_length(tmp_path: Path, total: int) -> None:
    e = "<"
    data = shb(e) + struct.pack(e + "II", 1, total) + b"\x00" * 32
    _assert_error(write(tmp_path, data, "len.pcapng"), "bad block total length")


def test_pcapng_epb_missing_interface(tmp_path: Path) -> None:
    e = "<"
    data = shb(e) + idb(e) + epb(e, 3, 0, FRAME_A)
    _assert_error(write(tmp_path, data, "noif.pcapng"), "interface 3")


def test_pcapng_caplen_exceeds_block(tmp_path: Path) -> None:
    e = "<"
    body = struct.pack(e + "IIIII", 0, 0, 0, 200, 200) + FRAME_A
    data = shb(e) + idb(e) + block(e, 6, body)
    _assert_error(write(tmp_path, data, "cap.pcapng"), "does not fit")


def test_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(shb("<"))
    data[8:12] = b"\x00\x11\x22\x33"
    _assert_error(write(tmp_path, bytes(data), "bom.pcapng"), "byte-order magic")


def test_pcapng_truncated_block(tmp_path: Path) -> None:
    e = "<"
    data = shb(e) + idb(e) + epb(e, 0, 0, FRAME_A)
    _assert_error(write(tmp_path, data[:-6], "cut.pcapng"), "truncated")


# --------------------------------------------------------------------------
# Robustness: any input either parses or raises PcapError
# --------------------------------------------------------------------------

_SAMPLES = [
    classic_pcap([(1, 2, FRAME_A), (3, 4, FRAME_B)]),
    classic_pcap([(1, 2, FRAME_C)], endian=">", nanos=True),
    shb("<") + idb("<", tsresol=9) + epb("<", 0, 12345, FRAME_A) + spb("<", FRAME_B)
    + block("<", 5, b"\x00" * 12),
    shb(">") + idb(">", tsresol=0x8A) + epb(">", 0, 99, FRAME_C) + shb("<") + idb("<")
    + epb("<", 0, 7, FRAME_A),
]
_MAGICS = [b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
           b"\x0a\x0d\x0d\x0a"]


@st.composite
def _mutated_sample(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut])


_ANY_INPUT = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, rest: m + rest, st.sampled_from(_MAGICS), st.binary(max_size=300)),
    _mutated_sample(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_ANY_INPUT)
def test_arbitrary_input_yields_frames_or_pcap_error(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data, "fuzz.bin")
    try:
        for ts, frame in read_frames(path):
            assert isinstance(ts, float)
            assert isinstance(frame, bytes)
    except PcapError as exc:
        assert str(exc).startswith(str(path))
