"""Tests for dva.nf.xlat's packet rewrite: put_tuple against checksums recomputed by
scapy (the NAT's and lb's golden tests cover the connections around it)."""

from __future__ import annotations

import numpy as np
import scapy.layers.inet  # noqa: F401  (layer bindings)
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.l2 import Ether

from dva.nf.conntrack import F_ORIG_A, V_FLAGS, Conntrack, ct_make_key
from dva.nf.table import tbl_insert
from dva.nf.xlat import (
    KIND_ORIG,
    NUSER,
    packet_tuple,
    put_tuple,
    set_meta,
    set_x,
    translate,
    translate_first,
)
from dva.packet.build import ICMP, TCP, UDP, Eth, IPv4, Raw

addr = st.integers(0, 2**32 - 1)
port = st.integers(0, 0xFFFF)


def _ip(v: int) -> str:
    return ".".join(str(b) for b in v.to_bytes(4, "big"))


def _frame(kind: str, src: int, dst: int, sp: int, dp: int, data: bytes) -> bytes:
    ip = Eth() / IPv4(_ip(src), _ip(dst))
    if kind == "tcp":
        return bytes(ip / TCP(sport=sp, dport=dp) / Raw(data))
    if kind == "icmp":
        return bytes(ip / ICMP(id=sp, seq=3) / Raw(data))
    return bytes(ip / UDP(sport=sp, dport=dp, chksum=0 if kind == "udp0" else None)
                 / Raw(data))


def _recomputed(frame: bytes):
    """scapy's parse of ``frame`` and of the same with every checksum recomputed."""
    p = Ether(frame)
    q = p.copy()
    del q[SIP].chksum
    for layer in (STCP, SUDP, SICMP):
        if layer in q and not (layer is SUDP and p[SUDP].chksum == 0):
            del q[layer].chksum
    return p, Ether(bytes(q))


@given(kind=st.sampled_from(["tcp", "udp", "udp0", "icmp"]),
       old=st.tuples(addr, port, addr, port), new=st.tuples(addr, port, addr, port),
       keep=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
       data=st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_put_tuple_rewrites_and_keeps_every_checksum_right(kind, old, new, keep, data):
    """Any of the four fields changed or kept: the frame carries the new tuple and
    checksums equal to recomputed ones; a UDP datagram sent without a checksum
    keeps none; an ICMP echo's identifier becomes the destination's "port"."""
    frame = _frame(kind, old[0], old[2], old[1], old[3], data)
    a = np.frombuffer(frame, np.uint8).copy()
    proto = {"tcp": 6, "udp": 17, "udp0": 17, "icmp": 1}[kind]
    end = len(frame)
    assert packet_tuple(a, 14, 34, end, proto) == \
        (old[0], old[1], old[2], old[1] if kind == "icmp" else old[3])
    sa, sp, da, dp = (o if k else n for o, n, k in zip(old, new, keep))
    put_tuple(a, 14, 34, end, proto, sa, sp, da, dp)
    got, want = _recomputed(a.tobytes())
    assert (got[SIP].src, got[SIP].dst) == (_ip(sa), _ip(da))
    assert got[SIP].chksum == want[SIP].chksum
    if kind == "icmp":
        assert got[SICMP].id == dp
        assert got[SICMP].chksum == want[SICMP].chksum
        return
    layer = STCP if kind == "tcp" else SUDP
    assert (got[layer].sport, got[layer].dport) == (sp, dp)
    if kind == "udp0":
        assert got[SUDP].chksum == 0
    else:
        assert got[layer].chksum == want[layer].chksum


def test_put_tuple_other_protocols_get_their_addresses_alone():
    """Protocol 47 (GRE): the addresses and the IPv4 header checksum change, the
    bytes after the header do not."""
    frame = bytes(Eth() / IPv4("10.0.0.1", "10.0.0.2", proto=47) / Raw(bytes(range(16))))
    a = np.frombuffer(frame, np.uint8).copy()
    put_tuple(a, 14, 34, len(frame), 47, 0x0A090909, 1, 0x0A000002, 2)
    got, want = _recomputed(a.tobytes())
    assert got[SIP].src == "10.9.9.9" and got[SIP].dst == "10.0.0.2"
    assert got[SIP].chksum == want[SIP].chksum
    assert a[34:].tobytes() == bytes(range(16))


@given(kind=st.sampled_from(["tcp", "udp", "icmp", "gre"]),
       o=st.tuples(addr, port, addr, port), t=st.tuples(addr, port, addr, port),
       to_itself=st.booleans(), data=st.binary(max_size=16))
@settings(max_examples=200, deadline=None)
def test_translate_first_is_translate_from_the_new_entry(kind, o, t, to_itself, data):
    """A new connection's first packet, rewritten from the tuples its creator knows,
    comes out as :func:`translate` makes it from the entry (E1: key O, T kept),
    also for an endpoint sending to itself (both ends get T's source there)."""
    if to_itself:
        o = (o[0], o[1], o[0], o[1])
    proto = {"tcp": 6, "udp": 17, "icmp": 1, "gre": 47}[kind]
    if kind == "gre":
        frame = bytes(Eth() / IPv4(_ip(o[0]), _ip(o[2]), proto=47) / Raw(data))
    else:
        frame = _frame(kind, o[0], o[2], o[1], o[3], data)
    a = np.frombuffer(frame, np.uint8).copy()
    end = len(frame)
    sa, sp, da, dp = packet_tuple(a, 14, 34, end, proto)  # what a device reads: O
    nsa, nsp, nda, ndp = t
    if kind == "icmp":
        ndp = nsp  # an echo's identifier is one value, both ways (the NAT's rule)
    if kind == "gre":
        nsp = ndp = 0
    ct = Conntrack(16, user_words=NUSER)
    tb = ct.table
    key = ct.key
    a_is_src = ct_make_key(key, 0, proto, sa, sp, da, dp)
    e = tbl_insert(tb.keys, tb.state, tb.bucket, tb.expires, tb.info, key, 0, 10.0, 0.0)
    tb.vals[e, V_FLAGS] = F_ORIG_A if a_is_src else 0
    set_meta(tb.vals, e, KIND_ORIG, 1 << 8)
    set_x(tb.vals, e, nsa, nsp, nda, ndp)
    b = a.copy()
    translate(a, 14, 34, end, proto, tb.keys, tb.vals, e, True)
    translate_first(b, 14, 34, end, proto, sa, sp, da, dp, nsa, nsp, nda, ndp)
    assert a.tobytes() == b.tobytes()
