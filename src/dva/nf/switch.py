"""``switch``: a learning Ethernet bridge with VLAN access and trunk ports.

Ports: the names in ``ports`` (a list, or a mapping name -> port options), at most 63.

Config::

    type: switch
    ports: [h1, h2, up]             # all access ports in VLAN 1, or:
    ports:
      h1: {vlan: 10}                # access port, untagged, VLAN 10
      up: {trunk: [10, "20-29"], native: 1}   # 802.1Q trunk; untagged = native VLAN
    mac_table_size: 8192            # live MAC entries at most (per switch)
    aging: 300                      # seconds an unused MAC entry lives

Behaviour (IEEE 802.1Q bridge, as Linux's bridge): learns (VLAN, source MAC) ->
ingress port on every valid frame; forwards known unicast to its port, floods
broadcast, multicast and unknown unicast to every other port carrying the VLAN; never
sends a frame back out its ingress port. A frame leaves an access port untagged and a
trunk port tagged with its VLAN (untagged for the native VLAN); priority-tagged frames
(VID 0) are treated as untagged. IEEE reserved link-local destinations
(01:80:c2:00:00:0x: pause, STP, LACP, 802.1X) are not forwarded.

State: ``macs`` (shared state): key (VLAN << 48 | MAC) -> port, expiring ``aging``
seconds after the MAC was last seen; bounded by ``mac_table_size``: when it is full a
new MAC is not learned (counted ``mac_table_full``) and frames to it are flooded.

Drop reasons (``/nf/switch/<reason>``): see ``DROPS``. Counters: see ``EVENTS``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dva._jit import kernel
from dva.nf.base import MAX_PORTS, MULTI, Device, DeviceConfig, DeviceState, Name, drop_code
from dva.nf.table import I_EXPIRED, HashTable, tbl_insert, tbl_lookup, tbl_sweep
from dva.packet import layout as L
from dva.packet.batch import row_copy
from dva.packet.checksum import rd16, rd48, wr16
from dva.packet.pool import pool_copy

DROPS = (
    "runt",  # shorter than an Ethernet header
    "bad_vlan_tag",  # 802.1Q tag cut short
    "invalid_src_mac",  # multicast/broadcast or all-zero source address
    "link_local_dst",  # 01:80:c2:00:00:0x must not be bridged
    "tagged_on_access",  # a VLAN-tagged frame arrived on an access port
    "vlan_not_allowed",  # tagged with a VLAN the trunk does not carry
    "untagged_on_trunk",  # untagged frame on a trunk without a native VLAN
    "same_port",  # destination is learned on the ingress port
    "no_other_port",  # flood with no other port in the VLAN
    "no_headroom",  # no room to push an 802.1Q tag
)
(D_RUNT, D_BAD_TAG, D_BAD_SRC, D_LINK_LOCAL, D_TAGGED_ACCESS, D_VLAN_NOT_ALLOWED,
 D_UNTAGGED_TRUNK, D_SAME_PORT, D_NO_PORT, D_NO_HEADROOM) = range(len(DROPS))

EVENTS = (
    "learned",  # new (VLAN, MAC) entries
    "moved",  # a known MAC seen on another port
    "mac_table_full",  # a new MAC not learned because the table is full
    "aged",  # entries removed because they expired
    "flooded",  # frames flooded (broadcast, multicast or unknown unicast)
    "flood_copy_failed",  # no free slot for a flood copy: ports of one encoding missed it
)
(C_LEARNED, C_MOVED, C_FULL, C_AGED, C_FLOODED, C_COPY_FAILED) = range(len(EVENTS))

NOTES = ("", "known unicast", "broadcast: flood", "multicast: flood",
         "unknown unicast: flood")
N_KNOWN, N_BCAST, N_MCAST, N_UNKNOWN = 1, 2, 3, 4

ACCESS, TRUNK = 0, 1
NVLANS = 4096
SWEEP_SLOTS = 64  # MAC table slots checked for expiry per batch


class SwitchPort(BaseModel):
    """Options of one switch port: access (``vlan``) or trunk (``trunk``, ``native``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vlan: int | None = Field(default=None, ge=1, le=4094)
    trunk: list[int | str] | None = None
    native: int | None = Field(default=None, ge=1, le=4094)

    @field_validator("trunk")
    @classmethod
    def _ranges(cls, v: list[int | str] | None) -> list[int | str] | None:
        if v is not None:
            if not v:
                raise ValueError("a trunk must carry at least one VLAN")
            expand_vlans(v)
        return v

    @model_validator(mode="after")
    def _mode(self) -> SwitchPort:
        if self.vlan is not None and self.trunk is not None:
            raise ValueError("a port is either access (vlan) or trunk (trunk), not both")
        if self.native is not None and self.trunk is None:
            raise ValueError("native is only for trunk ports")
        return self


def expand_vlans(items: list[int | str]) -> list[int]:
    """VLAN list with "a-b" ranges expanded; each VID in 1..4094."""
    out: list[int] = []
    for it in items:
        if isinstance(it, int):
            lo = hi = it
        else:
            parts = str(it).split("-")
            try:
                lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
            except ValueError:
                raise ValueError(f"bad VLAN range {it!r}: expected N or N-M") from None
        if not (1 <= lo <= hi <= 4094):
            raise ValueError(f"bad VLAN {it!r}: VLAN ids are 1..4094")
        out.extend(range(lo, hi + 1))
    return out


class SwitchConfig(DeviceConfig):
    type: Literal["switch"]
    ports: list[Name] | dict[Name, SwitchPort | None]
    mac_table_size: int = Field(default=8192, ge=1, le=1_000_000)
    aging: float = Field(default=300.0, gt=0, le=1_000_000)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v):
        names = list(v)
        if not names:
            raise ValueError("a switch needs at least one port")
        if len(names) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports per device")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate port names: {', '.join(dup)}")
        return v

    def port_names(self) -> list[str]:
        return list(self.ports)

    def port_options(self) -> list[SwitchPort]:
        if isinstance(self.ports, list):
            return [SwitchPort() for _ in self.ports]
        return [o or SwitchPort() for o in self.ports.values()]


class SwitchState(DeviceState):
    def __init__(self, config: SwitchConfig) -> None:
        super().__init__(len(EVENTS))
        self.macs = HashTable(key_words=1, value_words=1, max_entries=config.mac_table_size)
        self.shared_tables["macs"] = self.macs
        self.key = np.zeros(1, np.int64)  # kernel scratch


@kernel
def _set_encoding(data, row, tagged, vid):
    """Make the frame untagged or tagged with ``vid`` (PCP kept); False: no headroom."""
    slot = row[L.SLOT]
    s = row[L.START]
    has_tag = row[L.TAGS] > 0
    if tagged:
        if has_tag:
            tci = rd16(data[slot], s + 14)
            wr16(data[slot], s + 14, (tci & 0xF000) | vid)
        else:
            if s < 4:
                return False
            for k in range(12):  # MACs move 4 bytes toward the headroom
                data[slot, s - 4 + k] = data[slot, s + k]
            wr16(data[slot], s + 8, L.ETH_VLAN)
            wr16(data[slot], s + 10, vid)
            row[L.START] = s - 4
            row[L.LEN] += 4
            row[L.TAGS] += 1
            if row[L.L3_OFF] >= 0:
                row[L.L3_OFF] += 4
            if row[L.L4_OFF] >= 0:
                row[L.L4_OFF] += 4
        row[L.VLAN] = vid
    elif has_tag:
        for k in range(11, -1, -1):  # MACs move 4 bytes over the tag, from the end
            data[slot, s + 4 + k] = data[slot, s + k]
        row[L.START] = s + 4
        row[L.LEN] -= 4
        row[L.TAGS] -= 1
        if row[L.L3_OFF] >= 0:
            row[L.L3_OFF] -= 4
        if row[L.L4_OFF] >= 0:
            row[L.L4_OFF] -= 4
        row[L.VLAN] = -1 if row[L.TAGS] == 0 else rd16(data[slot], s + 4 + 14) & 0xFFF
    return True


@kernel
def switch_kernel(data, free, top, meta, n, mode, pvlan, native, allowed, keys, vals,
                  state, bucket, expires, info, events, now, aging, key):
    """Decide rows [0, n); may append one flood copy per row. Returns the new row count.

    ``key`` is a 1-word scratch array (kernels do not allocate).
    """
    nports = mode.shape[0]
    expired_before = info[I_EXPIRED]
    total = n
    for i in range(n):
        row = meta[i]
        row[L.NOTE] = 0
        if row[L.PERR] == L.E_RUNT:
            row[L.VERDICT] = drop_code(D_RUNT)
            continue
        if row[L.PERR] == L.E_VLAN_TRUNC:
            row[L.VERDICT] = drop_code(D_BAD_TAG)
            continue
        slot = row[L.SLOT]
        s = row[L.START]
        pkt = data[slot, s:s + row[L.LEN]]
        src = rd48(pkt, 6)
        dst = rd48(pkt, 0)
        if (src >> 40) & 1 or src == 0:
            row[L.VERDICT] = drop_code(D_BAD_SRC)
            continue
        if (dst >> 4) == 0x0180C200000:
            row[L.VERDICT] = drop_code(D_LINK_LOCAL)
            continue
        inp = row[L.IN_PORT]
        vid = row[L.VLAN] if row[L.TAGS] > 0 else 0
        if mode[inp] == ACCESS:
            if vid != 0:
                row[L.VERDICT] = drop_code(D_TAGGED_ACCESS)
                continue
            v = pvlan[inp]
        elif vid != 0:
            if not allowed[inp, vid]:
                row[L.VERDICT] = drop_code(D_VLAN_NOT_ALLOWED)
                continue
            v = vid
        else:
            v = native[inp]
            if v < 0:
                row[L.VERDICT] = drop_code(D_UNTAGGED_TRUNK)
                continue

        # Learn the source.
        key[0] = (v << 48) | src
        e = tbl_lookup(keys, state, expires, info, key, now)
        if e >= 0:
            if vals[e, 0] != inp:
                vals[e, 0] = inp
                events[C_MOVED] += 1
            expires[e] = now + aging
        else:
            e = tbl_insert(keys, state, bucket, expires, info, key, -1, now + aging, now)
            if e >= 0:
                vals[e, 0] = inp
                events[C_LEARNED] += 1
            else:
                events[C_FULL] += 1

        # Forward.
        out = -1
        if (dst >> 40) & 1:
            row[L.NOTE] = N_BCAST if dst == 0xFFFFFFFFFFFF else N_MCAST
        else:
            key[0] = (v << 48) | dst
            e = tbl_lookup(keys, state, expires, info, key, now)
            if e >= 0:
                out = vals[e, 0]
                row[L.NOTE] = N_KNOWN
            else:
                row[L.NOTE] = N_UNKNOWN
        if out >= 0:
            if out == inp:
                row[L.VERDICT] = drop_code(D_SAME_PORT)
                continue
            tagged = mode[out] == TRUNK and native[out] != v
            if (tagged or row[L.TAGS] > 0) and not _set_encoding(data, row, tagged, v):
                row[L.VERDICT] = drop_code(D_NO_HEADROOM)
                continue
            row[L.VERDICT] = out
            continue

        # Flood: group the other ports of VLAN v by egress encoding.
        untagged_mask = 0
        tagged_mask = 0
        for p in range(nports):
            if p == inp or not allowed[p, v]:
                continue
            if mode[p] == TRUNK and native[p] != v:
                tagged_mask |= 1 << p
            else:
                untagged_mask |= 1 << p
        if untagged_mask == 0 and tagged_mask == 0:
            row[L.VERDICT] = drop_code(D_NO_PORT)
            continue
        events[C_FLOODED] += 1
        if untagged_mask != 0 and tagged_mask != 0:
            # One copy for the tagged ports; the original goes untagged.
            c = pool_copy(data, free, top, slot, s, row[L.LEN])
            if c < 0:
                events[C_COPY_FAILED] += 1
            else:
                row_copy(meta, total, meta, i)
                crow = meta[total]
                crow[L.SLOT] = c
                crow[L.ORIGIN] = -1
                if _set_encoding(data, crow, True, v):
                    crow[L.VERDICT] = MULTI
                    crow[L.MASK] = tagged_mask
                else:
                    crow[L.VERDICT] = drop_code(D_NO_HEADROOM)
                total += 1
            tagged_mask = 0
        tagged = tagged_mask != 0
        if not _set_encoding(data, row, tagged, v):
            row[L.VERDICT] = drop_code(D_NO_HEADROOM)
            continue
        row[L.VERDICT] = MULTI
        row[L.MASK] = tagged_mask if tagged else untagged_mask
    tbl_sweep(state, expires, info, now, SWEEP_SLOTS)
    events[C_AGED] += info[I_EXPIRED] - expired_before
    return total


class Switch(Device):
    type_name = "switch"
    config_model = SwitchConfig
    drop_reasons = DROPS
    counters = EVENTS
    notes = NOTES
    max_emit = 1

    def __init__(self, name: str, config: SwitchConfig) -> None:
        super().__init__(name, config)
        opts = config.port_options()
        n = len(opts)
        self.mode = np.zeros(n, np.int64)
        self.pvlan = np.full(n, -1, np.int64)
        self.native = np.full(n, -1, np.int64)
        self.allowed = np.zeros((n, NVLANS), np.bool_)
        for p, o in enumerate(opts):
            if o.trunk is not None:
                self.mode[p] = TRUNK
                self.allowed[p, expand_vlans(o.trunk)] = True
                if o.native is not None:
                    self.native[p] = o.native
                    self.allowed[p, o.native] = True
            else:
                self.pvlan[p] = o.vlan or 1
                self.allowed[p, self.pvlan[p]] = True
        self.aging = float(config.aging)

    def new_state(self) -> SwitchState:
        return SwitchState(self.config)

    def process(self, batch, state: SwitchState, now: float) -> None:
        t = state.macs
        pool = batch.pool
        batch.n = switch_kernel(pool.data, pool.free, pool.top, batch.meta, batch.n,
                                self.mode, self.pvlan, self.native, self.allowed, t.keys,
                                t.vals, t.state, t.bucket, t.expires, t.info, state.events,
                                now, self.aging, state.key)
        if t.needs_rebuild():
            state.events[C_AGED] += t.rebuild(now)
