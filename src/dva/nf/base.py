"""The device contract: what every network function declares and does.

A device type is one module with

* a frozen pydantic config model (subclass of :class:`DeviceConfig`, ``extra`` keys
  rejected) whose ``port_names()`` gives the device's named ports, in order;
* a state object (subclass of :class:`DeviceState`) holding **all** mutable state:
  flow state in :class:`~dva.nf.table.HashTable` s keyed within a flow bucket
  (exportable/importable by bucket set) and shared state (MAC tables, ARP caches,
  leases) kept apart so it can be replicated; plus the device's event counters;
* the declared ``drop_reasons`` (counted as ``/nf/<type>/<reason>``), ``counters``
  (events that are not drops) and ``notes`` (why-codes shown by ``dva trace``);
* ``process(batch, state, now)``: sets each packet's ``VERDICT`` (and ``MASK``).

Verdicts (column ``layout.VERDICT``):

* ``p >= 0`` -- send out port ``p``;
* ``MULTI`` -- send a copy out every port whose bit is set in column ``MASK``
  (flooding); the bytes are identical on every port;
* ``HOLD`` -- the device keeps the slot (e.g. waiting for ARP) and emits it later;
* ``drop_code(r)`` -- dropped for declared reason number ``r``.

``process`` may append rows to the batch (packets it generates: flood copies with a
different encoding, ARP requests, ICMP errors) up to ``n_in * (1 + max_emit) +
emit_reserve`` rows, which the engine guarantees fit. A generated row needs its
``SLOT``, ``START``, ``LEN`` and verdict; the engine stamps its tenant and origin and
parses it (offsets, hash, bucket) after ``process`` returns. The device instance itself is
immutable after construction (config and tables compiled from it); it never keeps
state on ``self``. ``now`` is passed in: devices read no clock.
"""

from __future__ import annotations

import io
import ipaddress
import re
from abc import ABC, abstractmethod
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, StringConstraints

from dva._jit import KernelCall, kernel
from dva.nf.table import HashTable

MULTI = -1
HOLD = -2
DROP_BASE = -3
MAX_PORTS = 63  # output masks are one int64 per packet

NAME_RE = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"
Name = Annotated[str, StringConstraints(pattern=NAME_RE)]
_name_re = re.compile(NAME_RE)


@kernel
def drop_code(reason):
    """The verdict for a drop with declared reason number ``reason``."""
    return DROP_BASE - reason


def drop_reason_of(verdict: int) -> int:
    return DROP_BASE - verdict


def host_address(v: str) -> int:
    """An IPv4 unicast host address from a config, as an int (0/8, 127/8, multicast,
    class E and broadcast are refused)."""
    try:
        a = ipaddress.IPv4Address(v)
    except ValueError as e:
        raise ValueError(f"bad address {v!r}: {e}") from None
    if int(a) >> 24 in (0, 127) or int(a) >> 28 >= 14:
        raise ValueError(f"bad address {v!r}: not a unicast host address")
    return int(a)


def port_range(v: int | str, what: str = "port range") -> tuple[int, int]:
    """A port (int) or ``"LO-HI"`` range from a config, as (lo, hi) within 0..65535."""
    if isinstance(v, bool):
        raise ValueError(f"bad {what} {v!r}")
    if isinstance(v, int):
        lo = hi = v
    else:
        parts = str(v).split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            raise ValueError(f"bad {what} {v!r}: expected N or LO-HI") from None
    if not (0 <= lo <= hi <= 65535):
        raise ValueError(f"bad {what} {v!r}: ports are 0..65535, LO <= HI")
    return lo, hi


def two_ports(v: list[str], kind: str, note: str = "") -> list[str]:
    """Check the port list of a two-port (bump in the wire) device."""
    if len(v) != 2 or v[0] == v[1]:
        raise ValueError(f"a {kind} has exactly two ports with different names{note}")
    return v


class DeviceConfig(BaseModel):
    """Base of every device config model: strict and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    def port_names(self) -> list[str]:  # pragma: no cover - every device overrides
        raise NotImplementedError


class DeviceState:
    """Base of every device state.

    Subclasses put their tables in ``flow_tables`` (per flow bucket, moved between
    workers) and ``shared_tables`` (replicated), each a dict name -> HashTable.
    """

    def __init__(self, n_events: int) -> None:
        self.events = np.zeros(max(n_events, 1), np.int64)
        self.bucket_mask = 4095  # the engine's flow bucket count - 1 (it sets it)
        self.flow_tables: dict[str, HashTable] = {}
        self.shared_tables: dict[str, HashTable] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self._calls: dict = {}
        self._bound: dict = {}

    def scratch(self, n: int, name: str = "rows") -> np.ndarray:
        """A kernel's work array ``name`` of at least ``n`` int64 (kernels do not
        allocate): e.g. one per row of a batch. Not state: nothing in it outlives
        the kernel call."""
        a = self._scratch.get(name)
        if a is None or a.shape[0] < n:
            a = self._scratch[name] = np.zeros(max(n, 256), np.int64)
        return a

    def kernel_call(self, device, fn):
        """What ``device`` calls to run kernel ``fn`` on this state: a
        :class:`dva._jit.KernelCall`'s ``target``, which types the arguments once
        (the device's arrays and this state's are allocated alike for the pair's whole
        life). Another device given this state (a reload that carried it) gets calls
        of its own."""
        return self._call_of(device, fn).target

    def _call_of(self, device, fn) -> KernelCall:
        c = self._calls.get(fn)
        if c is None or c[0] is not device:
            c = self._calls[fn] = (device, KernelCall(fn))
        return c[1]

    def bound(self, device, fn, build, rows: int) -> tuple[KernelCall, tuple]:
        """``(call, args)`` for ``device`` running kernel ``fn`` on this state: the
        :class:`dva._jit.KernelCall` of :meth:`kernel_call` (call its ``target``) and
        the arguments that are the same at every call, as ``build(state, rows)`` gave
        them at the first: the device's arrays and this state's (a table is never
        reallocated), and scratch arrays of at least ``rows`` rows. Looking those up
        cost about 1 us a batch for the NAT's 30 (4 ns a packet). Built again for
        another device (a reload that carried the state) or for more ``rows`` than
        the scratch arrays hold; ``build`` returns ``(args, rows they hold)``."""
        c = self._bound.get(fn)
        if c is None or c[0] is not device or rows > c[1]:
            args, fit = build(self, rows)
            c = self._bound[fn] = (device, fit, args, self._call_of(device, fn))
        return c[3], c[2]

    # Flow state moves with its buckets.
    def export_flows(self, buckets, now: float) -> bytes:
        return _pack({name: t.export_buckets(buckets, now)
                      for name, t in self.flow_tables.items()})

    def import_flows(self, data: bytes, now: float) -> int:
        return _unpack_into(self.flow_tables, data, now)

    def take_flows(self, buckets, now: float, alloc=None) -> dict:
        """The flow state of ``buckets`` as arrays per table (bucket moves between
        workers: what :meth:`export_flows` holds, without the byte format).
        ``alloc(rows, words)``: where each table's records go (a staging area)."""
        return {name: t.take_entries(buckets, now, None if alloc is None else
                                     alloc(len(t), t.record_words))
                for name, t in self.flow_tables.items()}

    def flow_words(self) -> int:
        """An upper bound of the words :meth:`take_flows` gives (each table's records
        rounded up to whole cache lines)."""
        return sum(len(t) * t.record_words + 8 for t in self.flow_tables.values())

    def put_flows(self, parts: dict, now: float) -> int:
        unknown = set(parts) - set(self.flow_tables)
        if unknown:
            raise ValueError(f"state for unknown tables: {sorted(unknown)}")
        return sum(self.flow_tables[name].put_entries(e, now) for name, e in parts.items())

    def remove_flows(self, buckets, now: float) -> int:
        return sum(t.remove_buckets(buckets, now) for t in self.flow_tables.values())

    # Shared state is copied whole.
    def export_shared(self, now: float) -> bytes:
        return _pack({name: t.export_buckets(None, now)
                      for name, t in self.shared_tables.items()})

    def import_shared(self, data: bytes, now: float) -> int:
        return _unpack_into(self.shared_tables, data, now)

    def merge_shared(self, data: bytes, now: float) -> int:
        """Fold another worker's replica of the shared tables in (newest entry wins:
        :meth:`HashTable.merge_entries`)."""
        n = 0
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for name in z.files:
                t = self.shared_tables.get(name)
                if t is not None:
                    n += t.merge_entries(z[name].tobytes(), now)
        return n

    def held_slots(self) -> int:
        """Packet slots this state keeps right now (HOLD verdicts not yet released)."""
        return 0

    def maintain(self, now: float) -> int:
        """Per-batch upkeep of every table; returns entries expired."""
        n = 0
        for t in self.flow_tables.values():
            n += t.maintain(now)
        for t in self.shared_tables.values():
            n += t.maintain(now)
        return n


def _pack(parts: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.frombuffer(v, np.uint8) for k, v in parts.items()})
    return buf.getvalue()


def _unpack_into(tables: dict[str, HashTable], data: bytes, now: float) -> int:
    n = 0
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        unknown = set(z.files) - set(tables)
        if unknown:
            raise ValueError(f"state for unknown tables: {sorted(unknown)}")
        for name in z.files:
            n += tables[name].import_entries(z[name].tobytes(), now)
    return n


class Device(ABC):
    """A network function. Subclasses set the class attributes and ``process``."""

    type_name: ClassVar[str]
    config_model: ClassVar[type[DeviceConfig]]
    drop_reasons: ClassVar[tuple[str, ...]]
    counters: ClassVar[tuple[str, ...]] = ()
    notes: ClassVar[tuple[str, ...]] = ()
    max_emit: ClassVar[int] = 0  # rows process() may append per input row
    emit_reserve: ClassVar[int] = 0  # plus this many per batch
    # True: the engine also calls process() with an empty batch on every tick (about
    # every 100 ms when live), so the device can act on time alone (ARP retries,
    # releasing or dropping held packets).
    ticks: ClassVar[bool] = False
    # True: a config reload starts this device with fresh state (its config asked for
    # a flush, e.g. a firewall's ``flush: true``) instead of carrying its flows over.
    flush_on_reload: bool = False
    # True: the runtime saves this device's shared state (``export_shared``) to a file
    # and loads it at start (dva.worker.persist), so it survives restarts (DHCP leases).
    persist: ClassVar[bool] = False
    # False: with several workers, this device's shared tables are not replicated:
    # the device's aliases (bucket_aliases) put all of its traffic in one flow bucket,
    # and the worker owning that bucket owns the tables (replication merges entries
    # but never deletes one, so it would bring back what the owner removed: a released
    # DHCP lease).
    replicate_shared: ClassVar[bool] = True

    def __init__(self, name: str, config: DeviceConfig) -> None:
        self.name = name
        self.config = config
        self.ports: tuple[str, ...] = tuple(config.port_names())
        self.port_index = {p: i for i, p in enumerate(self.ports)}

    @abstractmethod
    def new_state(self) -> DeviceState:
        """Fresh state for one worker."""

    @abstractmethod
    def process(self, batch, state: DeviceState, now: float) -> None:
        """Decide every row of ``batch`` (rows' ``IN_PORT`` is a port index)."""

    def bucket_aliases(self) -> list[tuple[int, ...]]:
        """Endpoints this device rewrites without keeping the flow bucket (port
        forwards, 1:1 NAT, load-balanced backends), as alias rows of
        :mod:`dva.packet.steer`: the runtime buckets them as their canonical endpoint so
        both directions of a rewritten flow reach the worker that owns it."""
        return []

    def owner_frame(self) -> bytes | None:
        """For a device whose shared tables are not replicated (``replicate_shared``):
        a frame of its traffic; the worker owning that frame's bucket owns the tables
        (the manager saves that worker's copy and gives it the persisted state)."""
        return None

    def describe(self) -> str:
        """One line for ``dva trace`` and status views."""
        return f"{self.name} ({self.type_name})"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "__abstractmethods__", None):
            return
        reasons = cls.drop_reasons
        if len(set(reasons)) != len(reasons) or not all(_name_re.match(r) for r in reasons):
            raise TypeError(f"{cls.__name__}: drop reasons must be unique names")
