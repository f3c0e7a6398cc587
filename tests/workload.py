"""Deterministic traffic for fuzz, differential tests (and nothing else).

``frames(seed, n)`` mixes well-formed frames of every header kind (few MACs, so
switches learn, move and flood), mutated frames (byte flips, truncations,
extensions) and random garbage.
"""

from __future__ import annotations

import random

import numpy as np

from dva.packet.build import ARP, ICMP, TCP, UDP, Dot1Q, Eth, ICMPv6, IPv4, IPv6, IPv6Ext, Raw

MACS = [f"02:00:00:00:00:{i:02x}" for i in range(1, 9)] + ["ff:ff:ff:ff:ff:ff",
                                                         "01:00:5e:00:00:fb"]


def valid_frame(r: random.Random) -> bytes:
    src = r.choice(MACS[:8])
    dst = r.choice(MACS)
    eth = Eth(src=src, dst=dst)
    if r.random() < 0.3:
        eth = eth / Dot1Q(vid=r.choice([0, 10, 20, 30]))
    kind = r.randrange(8)
    a4 = f"10.0.{r.randrange(4)}.{r.randrange(1, 9)}"
    b4 = f"10.0.{r.randrange(4)}.{r.randrange(1, 9)}"
    a6, b6 = f"2001:db8::{r.randrange(1, 9)}", f"2001:db8::{r.randrange(1, 9)}"
    payload = Raw(bytes(r.randrange(256) for _ in range(r.randrange(0, 40))))
    if kind == 0:
        return bytes(eth / ARP(op=r.choice([1, 2]), hwsrc=src, psrc=a4, pdst=b4))
    if kind == 1:
        return bytes(eth / IPv4(src=a4, dst=b4) / UDP(sport=r.randrange(65536),
                                                      dport=r.randrange(65536)) / payload)
    if kind == 2:
        return bytes(eth / IPv4(src=a4, dst=b4, options=b"\x01" * r.choice([0, 4, 8]))
                     / TCP(sport=r.randrange(65536), dport=80, flags=r.choice(["S", "SA", "A", "FA"]))
                     / payload)
    if kind == 3:
        return bytes(eth / IPv4(src=a4, dst=b4) / ICMP(type=r.choice([0, 8]), id=r.randrange(65536))
                     / payload)
    if kind == 4:
        return bytes(eth / IPv6(src=a6, dst=b6) / UDP(sport=r.randrange(65536), dport=53) / payload)
    if kind == 5:
        return bytes(eth / IPv6(src=a6, dst=b6) / IPv6Ext("hop") / TCP(sport=1, dport=2) / payload)
    if kind == 6:
        return bytes(eth / IPv6(src=a6, dst=b6) / ICMPv6(type=128, id=3) / payload)
    return bytes(eth / IPv4(src=a4, dst=b4, flags=1, frag=r.randrange(0, 4)) / payload)


def mutate(r: random.Random, f: bytes) -> bytes:
    b = bytearray(f)
    what = r.randrange(4)
    if what == 0 and b:
        for _ in range(r.randrange(1, 4)):
            b[r.randrange(len(b))] = r.randrange(256)
    elif what == 1:
        b = b[: r.randrange(len(b) + 1)]
    elif what == 2:
        b += bytes(r.randrange(256) for _ in range(r.randrange(1, 30)))
    else:
        i = r.randrange(len(b) + 1)
        b[i:i] = bytes(r.randrange(256) for _ in range(r.randrange(1, 6)))
    return bytes(b)


def frames(seed: int, n: int) -> list[bytes]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        x = r.random()
        if x < 0.6:
            out.append(valid_frame(r))
        elif x < 0.9:
            out.append(mutate(r, valid_frame(r)))
        else:
            out.append(bytes(r.randrange(256) for _ in range(r.randrange(0, 80))))
    return out


FUZZ_APPLIANCE = """
appliance: fuzz
devices:
  s1:
    type: switch
    mac_table_size: 6
    aging: 5
    ports:
      h1: {vlan: 10}
      h2: {}
      t1: {trunk: [10, 20]}
      t2: {trunk: ["1-30"], native: 1}
  s2:
    type: switch
    ports:
      t1: {trunk: [10, 20]}
      t2: {trunk: ["1-30"], native: 1}
      h3: {vlan: 20}
      h4: {}
      spare: {}
links:
  - [s1.t1, s2.t1]
  - [s1.t2, s2.t2]
attach:
  s1.h1: {memory: h1}
  s1.h2: {memory: h2}
  s2.h3: {memory: h3}
  s2.h4: {memory: h4}
"""
PORTS = ("h1", "h2", "h3", "h4")


def run_graph(inputs: list[tuple[float, str, bytes]], batch_size: int = 32, **kw):
    """Run FUZZ_APPLIANCE over (t, port, frame); returns (result, sent, pool_ok)."""
    from dva.dispatch.offline import OfflineRunner
    from dva.graph.appliance import parse_appliance
    from dva.ports.offline import MemoryPort

    ports = {p: MemoryPort(p) for p in PORTS}
    for t, p, f in inputs:
        ports[p].inbox.append((t, f))
    with OfflineRunner(parse_appliance(FUZZ_APPLIANCE), memory=ports,
                       batch_size=batch_size, **kw) as r:
        res = r.run()
        pool_ok = r.pool.available == r.pool.nslots
    return res, {p: [f for _, f in ports[p].sent] for p in PORTS}, pool_ok


def graph_inputs(seed: int, n: int) -> list[tuple[float, str, bytes]]:
    r = random.Random(seed ^ 0x5EED)
    t = 0.0
    out = []
    for f in frames(seed, n):
        t += r.choice([0.0, 0.0, 0.001, 0.5, 3.0])
        out.append((t, r.choice(PORTS), f))
    return out


def differential_outputs(seed: int, n: int) -> dict[str, np.ndarray]:
    """Everything the kernels compute on one workload, as arrays to compare."""
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch, PacketPool
    from dva.packet.checksum import l4_checksum
    from dva.packet.parse import parse

    fs = frames(seed, n)
    pool = PacketPool(n + 16)
    b = PacketBatch(pool, n)
    b.add_frames(fs)
    parse(b, nbuckets=4096)
    meta = b.meta[: b.n].copy()
    csums = np.full(b.n, -1, np.int64)
    for i in range(b.n):
        row = meta[i]
        ok = row[L.PERR] == 0 and row[L.PFLAGS] & L.F_L4_OK and row[L.PROTO] in (6, 17)
        if ok and not row[L.PFLAGS] & L.F_FRAG:
            pkt = pool.data[row[L.SLOT], row[L.START]:row[L.START] + row[L.LEN]]
            l3, l4 = int(row[L.L3_OFF]), int(row[L.L4_OFF])
            v6 = bool(row[L.PFLAGS] & L.F_IPV6)
            lo = 4 if v6 else 2
            end = l3 + (40 if v6 else 0) + ((int(pkt[l3 + lo]) << 8) | int(pkt[l3 + lo + 1]))
            csums[i] = l4_checksum(pkt, l3, l4, end - l4, int(row[L.PROTO]), v6,
                                   16 if row[L.PROTO] == 6 else 6)
    b.release_all()
    res, sent, _ = run_graph(graph_inputs(seed, n))
    out = {"meta": meta, "csums": csums,
           "counters": np.array(sorted(res.counters.items()), dtype=object).astype(str)}
    for p, fr in sent.items():
        out[f"sent_{p}"] = np.frombuffer(b"".join(fr), np.uint8)
        out[f"lens_{p}"] = np.array([len(f) for f in fr], np.int64)
    return out
