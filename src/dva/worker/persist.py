"""Device state kept across restarts: one file per device, written atomically.

Devices whose type sets ``Device.persist`` (the DHCP server: its leases) have their
shared state (``DeviceState.export_shared``) saved to

    DIR/<tenant>/<appliance>/<device>.state

and loaded when the appliance starts. ``dva run --state-dir DIR`` chooses DIR (live
runs: default ``$DVA_STATE_DIR``, else ``/var/lib/dva``; offline runs save nothing
unless ``--state-dir`` is given).

File format: the line ``DVA-STATE 1``, one line of JSON (device, type, ``now`` and
``clock_offset`` at the save, the wall time, the payload's length and SHA-256), then
the payload, the bytes ``export_shared(now)`` gave. A file that is cut short, altered,
of another device type or whose tables do not fit the device any more is reported
with the reason, moved aside as ``<device>.state.bad-<time>`` (kept for a human) and
the device starts with fresh state: a bad file never stops the appliance.

Writes are atomic: the file is written as a temporary file in the same directory,
flushed to disk (fsync), renamed over the old one, and the directory is fsynced. A
crash at any point leaves either the old file or the new one, whole; a torn
temporary file is never renamed and is removed at the next start.

When: after state changed (the state's ``persist_version()`` moved, or, for a state
without one, its export differs), at most every ``SAVE_INTERVAL`` seconds (checked on
the runner's ticks), and at shutdown. Saving costs an export and an fsync (a few ms
for thousands of leases), in the data-plane loop.

Time. Expiry times in tables are on the device clock (``now``): the monotonic clock
in live runs, which means nothing to another process after a reboot, capture time
offline. A file therefore also stores ``clock_offset`` = wall time - ``now`` at the
save. On load, every shared table's expiries move by ``saved offset - current
offset``, so each entry keeps its wall-clock expiry: a lease with 10 minutes left when
saved has 6 left after a 4-minute restart. Entries that expired meanwhile are dropped
(reported). Only wall time survives a reboot, so a wall clock stepped while the
appliance was down lengthens or shortens leases by the step. Offline runs use an offset
of 0 (capture timestamps are wall times) and cannot drop expired entries at load (the
first packet's time is not known yet): the tables expire them as time goes on.

Locking: a running appliance holds an exclusive ``flock`` on
``DIR/<tenant>/<appliance>/.lock``; a second ``dva run`` of the same appliance with
the same DIR is told so and runs without loading or saving state.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"DVA-STATE 1\n"
SAVE_INTERVAL = 0.5
MAX_HEADER = 4096
DEFAULT_DIR = "/var/lib/dva"


class StateFileError(ValueError):
    """A state file that cannot be used; the message says why."""


@dataclass
class Saved:
    header: dict
    payload: bytes


def encode(device: str, type_name: str, payload: bytes, now: float, offset: float) -> bytes:
    header = {"device": device, "type": type_name, "now": now, "clock_offset": offset,
              "wall": now + offset,
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + offset)),
              "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(data: bytes) -> Saved:
    """Check a state file's bytes whole; raises :class:`StateFileError`."""
    if not data.startswith(MAGIC):
        raise StateFileError("not a dva state file (no 'DVA-STATE 1' line)")
    nl = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if nl < 0:
        raise StateFileError("header line missing or cut short")
    try:
        header = json.loads(data[len(MAGIC):nl])
        length, digest = int(header["length"]), str(header["sha256"])
        float(header["now"]), float(header["clock_offset"])
        str(header["device"]), str(header["type"])
    except (ValueError, KeyError, TypeError):
        raise StateFileError("bad header line") from None
    payload = data[nl + 1:]
    if len(payload) != length:
        raise StateFileError(f"cut short or extended: {len(payload)} bytes of data, the "
                             f"header says {length}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StateFileError("data does not match its checksum (altered or torn)")
    return Saved(header, payload)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def shift_times(state, delta: float) -> None:
    """Move the expiry of every entry of ``state``'s shared tables by ``delta``."""
    for t in state.shared_tables.values():
        used = t.used()
        t.expires[used] += delta


def _version(state):
    v = getattr(state, "persist_version", None)
    if callable(v):
        return v()
    return None


class Persistence:
    """Loads and saves the persisted devices of one running appliance (an engine)."""

    def __init__(self, root: str | Path, tenant: str, appliance: str,
                 say: Callable[[str], None] | None = None) -> None:
        self.dir = Path(root) / tenant / appliance
        self.say = say
        self.messages: list[str] = []
        self.enabled = False
        self.saves = 0
        self.failures = 0
        self._lock_fd: int | None = None
        self._last: dict[str, tuple[int, object]] = {}  # device -> (id(state), version)
        self._last_save = -1e18
        self._last_error = ""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            self._tell(f"state directory {self.dir}: {e.strerror}; leases and other "
                       f"persisted state are not loaded or saved in this run")
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._tell(f"state directory {self.dir} is in use by another dva run of "
                       f"{tenant}/{appliance}; this run does not load or save state")
            return
        self._lock_fd = fd
        self.enabled = True
        for stale in self.dir.glob(".*.state.tmp-*"):  # torn writes of a dead run
            try:
                stale.unlink()
            except OSError:
                pass

    @staticmethod
    def wanted(plan) -> bool:
        return any(getattr(d, "persist", False) for d in plan.devices)

    def _tell(self, line: str) -> None:
        self.messages.append(line)
        if self.say is not None:
            self.say(line)

    def path(self, device: str) -> Path:
        return self.dir / f"{device}.state"

    def _devices(self, engine):
        for i, d in enumerate(engine.plan.devices):
            if getattr(d, "persist", False):
                yield i, d

    # -- load ------------------------------------------------------------------------
    def load(self, engine, now: float | None, offset: float) -> None:
        """Load every persisted device's file into ``engine`` (fresh states)."""
        if not self.enabled:
            return
        for i, dev in self._devices(engine):
            p = self.path(dev.name)
            if not p.exists():
                self._last[dev.name] = (id(engine.states[i]), _version(engine.states[i]))
                continue
            try:
                state, kept, dropped = self._load_one(p, dev, engine, now, offset)
            except (StateFileError, OSError, ValueError, KeyError) as e:
                bad = self._set_aside(p)
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self._tell(f"state file {p}: {why}; {dev.name} starts with fresh state"
                           + (f" (the file is kept as {bad.name})" if bad else ""))
                self._last[dev.name] = (id(engine.states[i]), _version(engine.states[i]))
                continue
            engine.states[i] = state
            self._last[dev.name] = (id(state), _version(state))
            tables = ", ".join(f"{name} {n}" for name, n in kept.items())
            self._tell(f"state of {dev.name} loaded from {p} ({tables}"
                       + (f"; {dropped} expired while stopped" if dropped else "") + ")")

    def _load_one(self, p: Path, dev, engine, now, offset):
        from dva.nf.table import TableFull

        saved = decode(p.read_bytes())
        h = saved.header
        if h["type"] != dev.type_name:
            raise StateFileError(f"saved by a {h['type']} device, {dev.name} is a "
                                 f"{dev.type_name}")
        state = dev.new_state()
        state.bucket_mask = engine.bucket_mask
        then = float(h["now"])
        try:
            state.import_shared(saved.payload, then)
        except TableFull as e:
            raise StateFileError(f"the saved entries do not fit the device's tables ({e})") \
                from None
        except Exception as e:  # whatever numpy says of bytes that are not its own
            raise StateFileError(f"bad table data ({type(e).__name__}: {e})") from None
        shift_times(state, float(h["clock_offset"]) - offset)
        dropped = 0
        if now is not None:
            for t in state.shared_tables.values():
                dropped += t.rebuild(now)
        kept = {name: len(t) for name, t in state.shared_tables.items()}
        return state, kept, dropped

    def _set_aside(self, p: Path) -> Path | None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for k in range(100):
            bad = p.with_name(f"{p.name}.bad-{stamp}" + (f"-{k}" if k else ""))
            if not bad.exists():
                try:
                    os.replace(p, bad)
                    return bad
                except OSError:
                    return None
        return None

    # -- save ------------------------------------------------------------------------
    def maybe_save(self, engine, now: float, offset: float, force: bool = False) -> int:
        """Save the devices whose state changed since their last save, unless the last
        save is less than ``SAVE_INTERVAL`` ago (``force``: regardless). Returns how
        many files were written."""
        if not self.enabled or (not force and now - self._last_save < SAVE_INTERVAL):
            return 0
        self._last_save = now
        n = 0
        for i, dev in self._devices(engine):
            st = engine.states[i]
            v = _version(st)
            data = None
            if v is None:
                data = st.export_shared(now)
                v = hashlib.sha256(data).hexdigest()
            mark = (id(st), v)
            if self._last.get(dev.name) == mark:
                continue
            if data is None:
                data = st.export_shared(now)
            try:
                write_atomic(self.path(dev.name),
                             encode(dev.name, dev.type_name, data, now, offset))
            except OSError as e:
                self.failures += 1
                msg = f"cannot save the state of {dev.name} to {self.path(dev.name)}: " \
                      f"{e.strerror or e}"
                if msg != self._last_error:  # once per distinct problem, not per tick
                    self._last_error = msg
                    self._tell(msg + " (will retry)")
                continue
            self._last[dev.name] = mark
            self._last_error = ""
            self.saves += 1
            n += 1
        return n

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self.enabled = False


def live_offset() -> float:
    """Wall time minus the live runner's clock (``time.monotonic``), now."""
    return time.time() - time.monotonic()
