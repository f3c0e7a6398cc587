"""Packet builders: small, strict, scapy-like layers that compose into frames.

Layers are frozen dataclasses composed with ``/``; ``bytes(stack)`` gives the
frame::

    frame = bytes(Eth() / IPv4(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=53))

Every field left as ``None`` is filled in from the surrounding layers at build
time (ether types, IP protocol numbers, header lengths, total lengths,
checksums) exactly as the RFCs say.  Any field given explicitly is written
verbatim, even if it is "wrong": tests need bad checksums and bad lengths on
purpose.

Auto-fill choices that the RFCs do not dictate follow scapy so that frames can
be compared byte for byte with it:

* the Ethernet type is 0x9000 and the 802.1Q inner type is 0 when the next
  layer has no ether type (nothing, or :class:`Raw`);
* the IPv4 protocol is 0 and the IPv6 / extension next header is 59 ("no next
  header") when the next layer is not an IP protocol;
* TCP/UDP/ICMPv6 checksums are 0 when no IP layer (optionally followed by IPv6
  extension headers) comes right before them, since there is no pseudo-header;
* the pseudo-header uses the final destination when the packet is source
  routed (a single IPv4 LSRR/SSRR option, or an IPv6 routing header with
  segments left), as RFC 9293 / RFC 8200 require;
* the pseudo-header length is the real length of the L4 segment, even when an
  explicit (possibly wrong) IP length is given.

This module is plain Python on purpose: it is used by tests and tools, not by
the compiled data plane, and it must not depend on scapy.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import KW_ONLY, dataclass, field
from typing import Iterator, Union

__all__ = [
    "Layer",
    "Stack",
    "Eth",
    "Dot1Q",
    "ARP",
    "IPv4",
    "IPv6",
    "IPv6Ext",
    "TCP",
    "UDP",
    "ICMP",
    "ICMPv6",
    "Raw",
    "mac_to_int",
    "int_to_mac",
    "checksum16",
    "TCP_FLAG_LETTERS",
    "IPV4_FLAG_NAMES",
    "IPV6EXT_KINDS",
]

ETH_MIN_FRAME = 60  # minimum Ethernet frame length without the 4-byte FCS
TPIDS = (0x8100, 0x88A8)
# Bit i of the 9-bit TCP flag field is TCP_FLAG_LETTERS[i]; "N" is NS (RFC 3540).
TCP_FLAG_LETTERS = "FSRPAUECN"
IPV4_FLAG_NAMES = {"MF": 0x1, "DF": 0x2, "RB": 0x4}
IPV6EXT_KINDS = {"hop": 0, "routing": 43, "dst": 60, "frag": 44}

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}")

MacLike = Union[str, bytes, bytearray]
IPv4Like = Union[str, bytes, int, ipaddress.IPv4Address]
IPv6Like = Union[str, bytes, int, ipaddress.IPv6Address]


# --------------------------------------------------------------------------
# helpers


def checksum16(data: bytes) -> int:
    """Internet checksum (RFC 1071) of ``data``; an odd tail byte is zero padded."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\x00"
    # 2**16 == 1 (mod 0xffff), so the one's complement sum of the 16-bit words
    # is the whole big-endian integer modulo 0xffff -- one C-speed operation
    # instead of a Python loop.  A non-zero sum folds to 0xffff, never 0.
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n != 0:
        s = 0xFFFF
    return ~s & 0xFFFF


def _mac_bytes(value: object, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise ValueError(f"bad MAC address for {what}: need 6 bytes, got {len(value)}")
        return bytes(value)
    if isinstance(value, str) and _MAC_RE.fullmatch(value):
        return bytes.fromhex(value.replace(value[2], ""))
    raise ValueError(
        f"bad MAC address {value!r} for {what}: expected 'aa:bb:cc:dd:ee:ff' or 6 bytes"
    )


def mac_to_int(mac: str) -> int:
    """``"aa:bb:cc:dd:ee:ff"`` (or 6 bytes) -> 48-bit integer."""
    return int.from_bytes(_mac_bytes(mac, "mac_to_int"), "big")


def int_to_mac(value: int) -> str:
    """48-bit integer -> ``"aa:bb:cc:dd:ee:ff"``."""
    if not isinstance(value, int) or not 0 <= value < 1 << 48:
        raise ValueError(f"bad MAC integer {value!r}: need 0 <= value < 2**48")
    return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))


def _mac_str(value: object, what: str) -> str:
    return ":".join(f"{b:02x}" for b in _mac_bytes(value, what))


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    if isinstance(value, ipaddress.IPv4Address):
        return value
    if isinstance(value, (str, bytes, int)) and not isinstance(value, bool):
        try:
            return ipaddress.IPv4Address(value)
        except ValueError:
            pass
    raise ValueError(f"bad IPv4 address {value!r} for {what}")


def _ipv6(value: object, what: str) -> ipaddress.IPv6Address:
    if isinstance(value, ipaddress.IPv6Address):
        return value
    if isinstance(value, (str, bytes, int)) and not isinstance(value, bool):
        try:
            return ipaddress.IPv6Address(value)
        except ValueError:
            pass
    raise ValueError(f"bad IPv6 address {value!r} for {what}")


def _uint(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what}={value} out of range 0..{(1 << bits) - 1}")
    return int(value)


def _opt_uint(value: object, bits: int, what: str) -> int | None:
    return None if value is None else _uint(value, bits, what)


def _bytes(value: object, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"{what} must be bytes, got {value!r}")


def _set(obj: object, name: str, value: object) -> None:
    # Layers are frozen; normalisation in __post_init__ is the one place that writes.
    object.__setattr__(obj, name, value)


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def tcp_flags_value(flags: object) -> int:
    """TCP flags as letters ("SA", any order) or an int -> 9-bit int."""
    if isinstance(flags, str):
        value = 0
        for ch in flags:
            i = TCP_FLAG_LETTERS.find(ch)
            if i < 0:
                raise ValueError(
                    f"bad TCP flag {ch!r} in {flags!r}: letters are {TCP_FLAG_LETTERS}"
                )
            value |= 1 << i
        return value
    return _uint(flags, 9, "TCP flags")


def tcp_flags_letters(value: int) -> str:
    """9-bit int -> letters in bit order (SYN+ACK -> "SA"); "" for 0."""
    return "".join(ch for i, ch in enumerate(TCP_FLAG_LETTERS) if value >> i & 1)


def ipv4_flags_value(flags: object) -> int:
    """IPv4 flags as an int (0x2 DF, 0x1 MF, 0x4 reserved) or names "DF+MF"."""
    if isinstance(flags, str):
        value = 0
        for name in filter(None, flags.split("+")):
            if name not in IPV4_FLAG_NAMES:
                raise ValueError(
                    f"bad IPv4 flag {name!r} in {flags!r}: names are "
                    + ", ".join(IPV4_FLAG_NAMES)
                )
            value |= IPV4_FLAG_NAMES[name]
        return value
    return _uint(flags, 3, "IPv4 flags")


def ipv4_flags_names(value: int) -> str:
    """3-bit int -> "DF", "MF", "DF+MF", ... ("" for 0)."""
    return "+".join(n for n, bit in sorted(IPV4_FLAG_NAMES.items(), key=lambda kv: -kv[1]) if value & bit)


# --------------------------------------------------------------------------
# layer plumbing


class Layer:
    """Base class of all layers; subclasses are frozen dataclasses."""

    def __truediv__(self, other: object) -> Stack:
        return Stack((self,)) / other

    def __bytes__(self) -> bytes:
        return bytes(Stack((self,)))

    def __len__(self) -> int:
        return len(bytes(self))

    def __bool__(self) -> bool:
        # Otherwise truthiness would go through __len__ and build the frame.
        return True

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        raise NotImplementedError


class Stack:
    """An ordered, immutable sequence of layers; ``bytes(stack)`` builds the frame."""

    __slots__ = ("layers",)

    def __init__(self, layers: tuple[Layer, ...] = ()) -> None:
        for layer in layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"not a layer: {layer!r}")
        self.layers: tuple[Layer, ...] = tuple(layers)

    def __truediv__(self, other: object) -> Stack:
        if isinstance(other, Stack):
            return Stack(self.layers + other.layers)
        if isinstance(other, Layer):
            return Stack(self.layers + (other,))
        if isinstance(other, (bytes, bytearray)):
            return Stack(self.layers + (Raw(bytes(other)),))
        return NotImplemented

    def __bytes__(self) -> bytes:
        # Inner layers are built first: outer lengths and checksums cover them.
        payload = b""
        for i in range(len(self.layers) - 1, -1, -1):
            payload = self.layers[i]._build(self.layers, i, payload)
        return payload

    def __len__(self) -> int:
        return len(bytes(self))

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def __repr__(self) -> str:
        return " / ".join(repr(layer) for layer in self.layers) or "Stack()"


def _next(layers: tuple[Layer, ...], index: int) -> Layer | None:
    return layers[index + 1] if index + 1 < len(layers) else None


def _ethertype_of(layer: Layer | None) -> int | None:
    if isinstance(layer, Dot1Q):
        return layer.tpid
    if isinstance(layer, ARP):
        return 0x0806
    if isinstance(layer, IPv4):
        return 0x0800
    if isinstance(layer, IPv6):
        return 0x86DD
    return None


def _ipproto_of(layer: Layer | None) -> int | None:
    if isinstance(layer, IPv6Ext):
        return IPV6EXT_KINDS[layer.kind]
    return {TCP: 6, UDP: 17, ICMP: 1, ICMPv6: 58, IPv4: 4, IPv6: 41}.get(type(layer))


def _pseudo_header(layers: tuple[Layer, ...], index: int, proto: int, length: int) -> bytes | None:
    """RFC 9293/768/8200 pseudo-header for the L4 layer at ``index``, or None."""
    final6: bytes | None = None
    j = index - 1
    # The routing header closest to the L4 header wins, as in scapy.
    while j >= 0 and isinstance(layers[j], IPv6Ext):
        if final6 is None:
            final6 = layers[j]._final_destination()
        j -= 1
    if j < 0:
        return None
    ip = layers[j]
    if isinstance(ip, IPv4):
        if length > 0xFFFF:
            raise ValueError(f"L4 segment of {length} bytes does not fit an IPv4 pseudo-header")
        return ip.src.packed + ip._final_destination() + struct.pack("!BBH", 0, proto, length)
    if isinstance(ip, IPv6):
        dst = final6 if final6 is not None else ip.dst.packed
        return ip.src.packed + dst + struct.pack("!I3xB", length, proto)
    return None


# --------------------------------------------------------------------------
# layers


@dataclass(frozen=True)
class Eth(Layer):
    """Ethernet II header.  ``pad=True`` zero-pads the finished frame to 60 bytes."""

    dst: MacLike = "ff:ff:ff:ff:ff:ff"
    src: MacLike = "02:00:00:00:00:01"
    type: int | None = None
    pad: bool = False

    def __post_init__(self) -> None:
        _set(self, "dst", _mac_str(self.dst, "Eth.dst"))
        _set(self, "src", _mac_str(self.src, "Eth.src"))
        _set(self, "type", _opt_uint(self.type, 16, "Eth.type"))
        if not isinstance(self.pad, bool):
            raise ValueError(f"Eth.pad must be a bool, got {self.pad!r}")

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        etype = self.type
        if etype is None:
            etype = _ethertype_of(_next(layers, index))
            if etype is None:
                etype = 0x9000
        out = _mac_bytes(self.dst, "") + _mac_bytes(self.src, "") + struct.pack("!H", etype) + payload
        if self.pad and len(out) < ETH_MIN_FRAME:
            out += bytes(ETH_MIN_FRAME - len(out))
        return out


@dataclass(frozen=True)
class Dot1Q(Layer):
    """802.1Q tag (TCI + inner type).  ``tpid`` is written into the previous
    layer's type field when that is auto-filled: 0x8100, or 0x88a8 for a QinQ
    outer tag."""

    vid: int
    pcp: int = 0
    dei: int = 0
    type: int | None = None
    tpid: int = 0x8100

    def __post_init__(self) -> None:
        _uint(self.vid, 12, "Dot1Q.vid")
        _uint(self.pcp, 3, "Dot1Q.pcp")
        _uint(self.dei, 1, "Dot1Q.dei")
        _set(self, "type", _opt_uint(self.type, 16, "Dot1Q.type"))
        if self.tpid not in TPIDS:
            raise ValueError(f"Dot1Q.tpid={self.tpid!r}: must be 0x8100 or 0x88a8")

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        etype = self.type
        if etype is None:
            etype = _ethertype_of(_next(layers, index))
            if etype is None:
                etype = 0
        tci = self.pcp << 13 | self.dei << 12 | self.vid
        return struct.pack("!HH", tci, etype) + payload


@dataclass(frozen=True)
class ARP(Layer):
    """ARP for Ethernet/IPv4 (hardware type 1, protocol 0x0800): 28 bytes."""

    op: int = 1
    _: KW_ONLY
    hwsrc: MacLike
    psrc: IPv4Like
    hwdst: MacLike = "00:00:00:00:00:00"
    pdst: IPv4Like

    def __post_init__(self) -> None:
        _uint(self.op, 16, "ARP.op")
        _set(self, "hwsrc", _mac_str(self.hwsrc, "ARP.hwsrc"))
        _set(self, "hwdst", _mac_str(self.hwdst, "ARP.hwdst"))
        _set(self, "psrc", _ipv4(self.psrc, "ARP.psrc"))
        _set(self, "pdst", _ipv4(self.pdst, "ARP.pdst"))

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        return (
            struct.pack("!HHBBH", 1, 0x0800, 6, 4, self.op)
            + _mac_bytes(self.hwsrc, "")
            + self.psrc.packed
            + _mac_bytes(self.hwdst, "")
            + self.pdst.packed
            + payload
        )


def _ipv4_source_route_dst(options: bytes) -> bytes | None:
    """Final destination of a single LSRR/SSRR option (RFC 791), else None."""
    routes: list[bytes] = []
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break  # malformed: stop rather than guess
        olen = options[i + 1]
        if kind in (0x83, 0x89):
            routes.append(options[i + 3 : i + olen])
        i += olen
    if len(routes) == 1 and len(routes[0]) >= 4:
        addrs = routes[0][: len(routes[0]) // 4 * 4]
        return addrs[-4:]
    return None


@dataclass(frozen=True)
class IPv4(Layer):
    """IPv4 header.  ``flags``: 0x2 DF, 0x1 MF, 0x4 reserved (or names "DF+MF");
    ``frag`` is in 8-byte units; ``options`` are zero padded to 4 bytes."""

    src: IPv4Like
    dst: IPv4Like
    ttl: int = 64
    proto: int | None = None
    tos: int = 0
    id: int = 0
    flags: int | str = 0
    frag: int = 0
    options: bytes = b""
    ihl: int | None = None
    len: int | None = None
    chksum: int | None = None

    def __post_init__(self) -> None:
        _set(self, "src", _ipv4(self.src, "IPv4.src"))
        _set(self, "dst", _ipv4(self.dst, "IPv4.dst"))
        _uint(self.ttl, 8, "IPv4.ttl")
        _set(self, "proto", _opt_uint(self.proto, 8, "IPv4.proto"))
        _uint(self.tos, 8, "IPv4.tos")
        _uint(self.id, 16, "IPv4.id")
        _set(self, "flags", ipv4_flags_value(self.flags))
        _uint(self.frag, 13, "IPv4.frag")
        _set(self, "options", _bytes(self.options, "IPv4.options"))
        _set(self, "ihl", _opt_uint(self.ihl, 4, "IPv4.ihl"))
        _set(self, "len", _opt_uint(self.len, 16, "IPv4.len"))
        _set(self, "chksum", _opt_uint(self.chksum, 16, "IPv4.chksum"))
        if self.ihl is None and len(_pad4(self.options)) > 40:
            raise ValueError(
                f"IPv4.options of {len(self.options)} bytes do not fit (max 40) unless ihl is given"
            )

    def _final_destination(self) -> bytes:
        return _ipv4_source_route_dst(self.options) or self.dst.packed

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        opts = _pad4(self.options)
        hlen = 20 + len(opts)
        ihl = self.ihl if self.ihl is not None else hlen // 4
        total = self.len
        if total is None:
            total = hlen + len(payload)
            if total > 0xFFFF:
                raise ValueError(f"IPv4 total length {total} exceeds 65535")
        proto = self.proto
        if proto is None:
            proto = _ipproto_of(_next(layers, index)) or 0
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            self.tos,
            total,
            self.id,
            self.flags << 13 | self.frag,
            self.ttl,
            proto,
            0,
            self.src.packed,
            self.dst.packed,
        ) + opts
        chk = self.chksum if self.chksum is not None else checksum16(hdr)
        return hdr[:10] + struct.pack("!H", chk) + hdr[12:] + payload


@dataclass(frozen=True)
class IPv6(Layer):
    """IPv6 fixed header (40 bytes)."""

    src: IPv6Like
    dst: IPv6Like
    hlim: int = 64
    nh: int | None = None
    tc: int = 0
    fl: int = 0
    plen: int | None = None

    def __post_init__(self) -> None:
        _set(self, "src", _ipv6(self.src, "IPv6.src"))
        _set(self, "dst", _ipv6(self.dst, "IPv6.dst"))
        _uint(self.hlim, 8, "IPv6.hlim")
        _set(self, "nh", _opt_uint(self.nh, 8, "IPv6.nh"))
        _uint(self.tc, 8, "IPv6.tc")
        _uint(self.fl, 20, "IPv6.fl")
        _set(self, "plen", _opt_uint(self.plen, 16, "IPv6.plen"))

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        plen = self.plen
        if plen is None:
            plen = len(payload)
            if plen > 0xFFFF:
                raise ValueError(f"IPv6 payload length {plen} exceeds 65535 (no jumbograms)")
        nh = self.nh
        if nh is None:
            nh = _ipproto_of(_next(layers, index))
            if nh is None:
                nh = 59
        first = 6 << 28 | self.tc << 20 | self.fl
        return (
            struct.pack("!IHBB", first, plen, nh, self.hlim)
            + self.src.packed
            + self.dst.packed
            + payload
        )


@dataclass(frozen=True)
class IPv6Ext(Layer):
    """IPv6 extension header.

    ``kind`` "hop", "dst": ``data`` is the option area, padded with Pad1/PadN
    to a multiple of 8 bytes; "routing": ``data`` starts with routing type and
    segments left and must already make the header a multiple of 8 bytes;
    "frag": the 8-byte fragment header from ``offset`` (8-byte units), ``m``,
    ``ident`` (and the reserved ``res1``/``res2``, normally 0).
    """

    kind: str
    nh: int | None = None
    data: bytes = b""
    offset: int = 0
    m: int = 0
    ident: int = 0
    res1: int = 0
    res2: int = 0

    def __post_init__(self) -> None:
        if self.kind not in IPV6EXT_KINDS:
            raise ValueError(
                f"bad IPv6Ext kind {self.kind!r}: one of " + ", ".join(IPV6EXT_KINDS)
            )
        _set(self, "nh", _opt_uint(self.nh, 8, "IPv6Ext.nh"))
        _set(self, "data", _bytes(self.data, "IPv6Ext.data"))
        _uint(self.offset, 13, "IPv6Ext.offset")
        _uint(self.m, 1, "IPv6Ext.m")
        _uint(self.ident, 32, "IPv6Ext.ident")
        _uint(self.res1, 8, "IPv6Ext.res1")
        _uint(self.res2, 2, "IPv6Ext.res2")
        if self.kind == "frag":
            if self.data:
                raise ValueError("IPv6Ext kind 'frag' takes offset/m/ident, not data")
        else:
            if self.offset or self.m or self.ident or self.res1 or self.res2:
                raise ValueError(
                    f"IPv6Ext kind {self.kind!r} takes data; offset/m/ident/res1/res2 are frag-only"
                )
            if self.kind == "routing" and (2 + len(self.data)) % 8:
                raise ValueError(
                    f"IPv6Ext routing data of {len(self.data)} bytes: 2 + len(data) "
                    "must be a multiple of 8"
                )
            if len(self._body()) > 2046:
                raise ValueError(f"IPv6Ext data of {len(self.data)} bytes is too long (max 2046)")

    def _body(self) -> bytes:
        need = -(2 + len(self.data)) % 8
        if need == 1:
            return self.data + b"\x00"  # Pad1
        if need:
            return self.data + bytes((1, need - 2)) + bytes(need - 2)  # PadN
        return self.data

    def _final_destination(self) -> bytes | None:
        # data = routing type, segments left, 4 type-specific bytes, addresses
        if self.kind != "routing" or len(self.data) < 22 or self.data[1] == 0:
            return None
        rtype = self.data[0]
        addrs = self.data[6:]
        if rtype in (0, 2):
            return addrs[(len(addrs) // 16 - 1) * 16 :][:16]
        if rtype == 4:  # SRH: segment list is in reverse order (RFC 8754)
            return addrs[:16]
        return None

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        nh = self.nh
        if nh is None:
            nh = _ipproto_of(_next(layers, index))
            if nh is None:
                nh = 59
        if self.kind == "frag":
            return (
                struct.pack(
                    "!BBHI", nh, self.res1, self.offset << 3 | self.res2 << 1 | self.m, self.ident
                )
                + payload
            )
        body = self._body()
        return bytes((nh, (2 + len(body)) // 8 - 1)) + body + payload


@dataclass(frozen=True)
class TCP(Layer):
    """TCP header.  ``flags`` are letters from "FSRPAUECN" (N = NS) or an int;
    ``options`` are zero padded to 4 bytes; ``reserved`` is the 3 reserved bits."""

    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int | str = "S"
    window: int = 65535
    options: bytes = b""
    dataofs: int | None = None
    chksum: int | None = None
    urgptr: int = 0
    reserved: int = 0

    def __post_init__(self) -> None:
        _uint(self.sport, 16, "TCP.sport")
        _uint(self.dport, 16, "TCP.dport")
        _uint(self.seq, 32, "TCP.seq")
        _uint(self.ack, 32, "TCP.ack")
        _set(self, "flags", tcp_flags_value(self.flags))
        _uint(self.window, 16, "TCP.window")
        _set(self, "options", _bytes(self.options, "TCP.options"))
        _set(self, "dataofs", _opt_uint(self.dataofs, 4, "TCP.dataofs"))
        _set(self, "chksum", _opt_uint(self.chksum, 16, "TCP.chksum"))
        _uint(self.urgptr, 16, "TCP.urgptr")
        _uint(self.reserved, 3, "TCP.reserved")
        if self.dataofs is None and len(_pad4(self.options)) > 40:
            raise ValueError(
                f"TCP.options of {len(self.options)} bytes do not fit (max 40) unless dataofs is given"
            )

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        opts = _pad4(self.options)
        dataofs = self.dataofs if self.dataofs is not None else 5 + len(opts) // 4
        seg = struct.pack(
            "!HHIIBBHHH",
            self.sport,
            self.dport,
            self.seq,
            self.ack,
            dataofs << 4 | self.reserved << 1 | self.flags >> 8,
            self.flags & 0xFF,
            self.window,
            0,
            self.urgptr,
        ) + opts + payload
        chk = self.chksum
        if chk is None:
            pseudo = _pseudo_header(layers, index, 6, len(seg))
            chk = 0 if pseudo is None else checksum16(pseudo + seg)
        return seg[:16] + struct.pack("!H", chk) + seg[18:]


@dataclass(frozen=True)
class UDP(Layer):
    """UDP header.  An auto checksum that computes to 0 is sent as 0xffff."""

    sport: int
    dport: int
    len: int | None = None
    chksum: int | None = None

    def __post_init__(self) -> None:
        _uint(self.sport, 16, "UDP.sport")
        _uint(self.dport, 16, "UDP.dport")
        _set(self, "len", _opt_uint(self.len, 16, "UDP.len"))
        _set(self, "chksum", _opt_uint(self.chksum, 16, "UDP.chksum"))

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        ulen = self.len
        if ulen is None:
            ulen = 8 + len(payload)
            if ulen > 0xFFFF:
                raise ValueError(f"UDP length {ulen} exceeds 65535")
        seg = struct.pack("!HHHH", self.sport, self.dport, ulen, 0) + payload
        chk = self.chksum
        if chk is None:
            pseudo = _pseudo_header(layers, index, 17, len(seg))
            # 0 means "no checksum" (RFC 768), so a computed 0 goes out as 0xffff
            chk = 0 if pseudo is None else (checksum16(pseudo + seg) or 0xFFFF)
        return seg[:6] + struct.pack("!H", chk) + seg[8:]




def _icmp_rest(rest: object, ident: int, seq: int, what: str) -> bytes:
    if rest is None:
        return struct.pack("!HH", ident, seq)
    rest = _bytes(rest, f"{what}.rest")
    if len(rest) != 4:
        raise ValueError(f"{what}.rest must be exactly 4 bytes, got {len(rest)}")
    return rest


@dataclass(frozen=True)
class _ICMPBase(Layer):
    """What ICMP and ICMPv6 share: the fields, their checks and the message layout.
    The 4 bytes after the checksum are ``id``+``seq`` (echo layout) unless ``rest``
    (4 bytes) is given, which wins for any type. Subclasses give the checksum."""

    type: int = 8
    code: int = 0
    id: int = 0
    seq: int = 0
    chksum: int | None = None
    rest: bytes | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _uint(self.type, 8, f"{name}.type")
        _uint(self.code, 8, f"{name}.code")
        _uint(self.id, 16, f"{name}.id")
        _uint(self.seq, 16, f"{name}.seq")
        _set(self, "chksum", _opt_uint(self.chksum, 16, f"{name}.chksum"))
        if self.rest is not None:
            _set(self, "rest", _icmp_rest(self.rest, 0, 0, name))

    def _checksum(self, layers: tuple[Layer, ...], index: int, msg: bytes) -> int:
        raise NotImplementedError

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        msg = (
            struct.pack("!BBH", self.type, self.code, 0)
            + _icmp_rest(self.rest, self.id, self.seq, type(self).__name__)
            + payload
        )
        chk = self.chksum if self.chksum is not None else self._checksum(layers, index, msg)
        return msg[:2] + struct.pack("!H", chk) + msg[4:]


@dataclass(frozen=True)
class ICMP(_ICMPBase):
    """ICMP (v4): the checksum covers the message only."""

    type: int = 8

    def _checksum(self, layers: tuple[Layer, ...], index: int, msg: bytes) -> int:
        return checksum16(msg)


@dataclass(frozen=True)
class ICMPv6(_ICMPBase):
    """ICMPv6: the checksum covers the IPv6 pseudo-header too (RFC 4443)."""

    type: int = 128

    def _checksum(self, layers: tuple[Layer, ...], index: int, msg: bytes) -> int:
        pseudo = _pseudo_header(layers, index, 58, len(msg))
        return 0 if pseudo is None else checksum16(pseudo + msg)


@dataclass(frozen=True)
class Raw(Layer):
    """Opaque bytes."""

    data: bytes = field(default=b"")

    def __post_init__(self) -> None:
        _set(self, "data", _bytes(self.data, "Raw.data"))

    def _build(self, layers: tuple[Layer, ...], index: int, payload: bytes) -> bytes:
        return self.data + payload
