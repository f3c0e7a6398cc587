"""A bounded open-addressing hash table over numpy arrays, usable from kernels.

Every piece of device state that grows with traffic (MAC tables, connection
tracking, NAT mappings, LB affinity) is one of these, so that bounding, expiry and
moving state by flow bucket are written once:

* one record per slot (one int64 row, cache-line aligned: expiry, key words, bucket,
  value words), so that a lookup or an insert touches one or two cache lines -- one
  when what it reads or writes is in the first eight words (:data:`HOT_ONLY`); the
  kernels take column
  views of it (``keys``, ``vals``, ``bucket``, ``expires``);
* and one **control byte** per slot in a dense array of its own (``state``: 64
  slots a cache line, a few MiB for millions of slots, so it mostly stays cached):
  ``EMPTY``, ``TOMB``, or for a used slot an odd code carrying 6 bits of the key's
  hash (:func:`used_code`). A probe reads the control bytes and compares keys only
  where the code matches; a key that is absent costs no record read, and a run-ahead
  can find the slot a key is in (or would go) and fetch that record alone
  (:func:`tbl_prefetch_found`; in a device, a few rows ahead of its decision loop:
  :func:`tbl_prefetch_found_ahead`); that slot, the key's *candidate*, then spares
  the batch's later lookups and inserts of the key their probes
  (:func:`tbl_lookup_at`, :func:`tbl_insert_at`) while no slot is freed;
* keys are ``key_words`` int64 words, values ``value_words`` int64 words; each entry
  also has the flow ``bucket`` it belongs to (``-1`` for shared, non-flow state) and
  an ``expires`` time (seconds, same clock as ``now``);
* ``max_entries`` live entries at most; the slot array is at least twice that, so
  probe chains stay short;
* an expired entry is absent to lookups and is reclaimed lazily (when a lookup of
  its key meets it) and by an incremental sweep that checks a fixed number of slots
  per batch, so expiry costs no full-table scan;
* deletions leave tombstones; :meth:`HashTable.maintain` rebuilds the slot array when
  tombstones pile up;
* :meth:`HashTable.export_buckets` / :meth:`HashTable.import_entries` move the entries
  of a set of buckets as bytes (numpy's ``.npz``, no pickle).

Kernels take the arrays, not the object: ``t.arrays()`` gives them in the order the
``tbl_*`` kernels expect.
"""

from __future__ import annotations

import io

import numpy as np

from dva._jit import i64, inline_copy, inline_kernel, kernel, prefetch, u64

EMPTY, USED, TOMB = 0, 1, 2  # control bytes: USED is the low bit of every used code
# info[] slots. I_CLEAN: 1 while no slot was freed since the batch's first run-ahead
# pass began (:func:`tbl_begin_pass`), when a free candidate proves a key absent
I_LIVE, I_TOMBS, I_MAX, I_CURSOR, I_EXPIRED, I_CLEAN = 0, 1, 2, 3, 4, 5
NINFO = 6
IMPORT_BLOCK = 32  # entries whose home slots an import prefetches (misses overlap)
AHEAD = 12  # rows a decision loop's record prefetches run ahead of it

M32 = 0xFFFFFFFF
# In a run-ahead's hash (above its 32 bits): the row reads, or when its key is absent
# writes, only its record's first line (expiry, key, bucket, the first value words),
# so that line alone is fetched (:func:`tbl_prefetch_found`). A device sets it where
# that holds.
HOT_ONLY = 1 << 32


MUL = 0x5851F42D4C957F2D  # odd, < 2**63 so numba types it as int64


@inline_kernel
def tbl_hash(key):
    """Multiply-shift hash of the key words (32 bits).

    Bits 32..63 of a 64-bit product depend only on the product modulo 2**64, so the
    compiled code (wrapping uint64: :func:`_mix`) and the reference (exact ints)
    agree.

    The first three words are written out (connection tables' keys and the NAT's
    mappings have two, MAC and ARP tables' one; DHCP and the policer loop on), so
    that the code is straight for them: a loop to the key's length, which numba
    does not know, cost 5% of a new lb connection with :func:`_key_eq` and
    :func:`_place` (docs/benchmarks.md). The branches go the same way every time.
    """
    n = key.shape[0]
    h = _mix(0x2545F491, key[0])
    if n > 1:
        h = _mix(h, key[1])
    if n > 2:
        h = _mix(h, key[2])
    for w in range(3, n):
        h = _mix(h, key[w])
    return h


@inline_kernel
def _mix(h, w):
    """Bits 32..63 of ``(h ^ w) * MUL`` modulo 2**64, multiplied unsigned: a signed
    multiply is one numba tells LLVM never overflows, and a kernel that built its
    keys from values of known ranges got one constant for every key (``u64``)."""
    return i64(((u64(h ^ i64(w)) * u64(MUL)) >> u64(32)) & u64(M32))


@inline_kernel
def used_code(h):
    """The control byte of a used slot whose key hashes to ``h`` (32 bits): odd,
    with hash bits 26..31, which no slot number of a table of up to 2**26 slots
    uses."""
    return ((h >> 26) << 1) | USED


@inline_kernel
def is_used(st):
    return (st & USED) != 0


@inline_kernel
def _record_lines(expires, s, upto):
    """Prefetch the record of slot ``s`` (each of its cache lines: ``expires`` is a
    column view, its rows are the records) and with ``upto`` 1 the next record's
    first line too."""
    for off in range(0, expires.strides[0] + upto, 64):
        prefetch(expires, s, off)


@inline_kernel
def tbl_prefetch(state, expires, s):
    """Prefetch slot ``s``: its control byte's line, its record whole and the next
    record's first line (where a probe goes on). For a loop that runs ahead of
    lookups in a large table, when a second pass (:func:`tbl_prefetch_found`) is not
    worth it."""
    prefetch(state, s, 0)
    _record_lines(expires, s, 1)


@inline_kernel
def tbl_prefetch_hot(state, expires, s):
    """:func:`tbl_prefetch` for a reader of the first lines alone
    (:data:`HOT_ONLY`): slot ``s``'s control byte's line, its record's first line and
    the next record's."""
    prefetch(state, s, 0)
    prefetch(expires, s, 0)
    prefetch(expires, s, expires.strides[0])


@inline_kernel
def tbl_prefetch_ctrl(state, h):
    """First pass of a two-pass run-ahead: the control bytes of the home slot of a
    key that hashes to ``h`` (the line a probe of it reads first)."""
    prefetch(state, h & (state.shape[0] - 1), 0)


@inline_kernel
def tbl_slot_for(state, h):
    """From the control bytes alone, the slot a key that hashes to ``h`` is in: the
    first on its probe path whose code matches (a false match is one in 64), else
    the first free one, where :func:`tbl_insert` would put it."""
    mask = state.shape[0] - 1
    u = used_code(h)
    s = h & mask
    free = -1
    for _ in range(state.shape[0]):
        st = state[s]
        if st == u:
            return s
        if st == EMPTY:
            return free if free >= 0 else s
        if free < 0 and not is_used(st):
            free = s
        s = (s + 1) & mask
    return free if free >= 0 else s


@inline_kernel
def tbl_prefetch_found(state, expires, h):
    """Second pass: the record of :func:`tbl_slot_for` (its control bytes fetched by
    :func:`tbl_prefetch_ctrl`), whole, or its first line alone when ``h`` carries
    :data:`HOT_ONLY` (the entry read there, or the new entry written there). A
    batch's records then come in one miss a line, with no line fetched for a slot
    the probe does not use. Returns that slot."""
    s = tbl_slot_for(state, h & M32)
    if (h & HOT_ONLY) != 0:
        prefetch(expires, s, 0)
    else:
        _record_lines(expires, s, 0)
    return s


@inline_kernel
def tbl_begin_pass(info):
    """A batch's first run-ahead pass begins: candidates found from here on may
    prove keys absent (:func:`tbl_lookup_at`) until a slot is freed."""
    info[I_CLEAN] = 1


@inline_kernel
def tbl_prefetch_found_rows(state, expires, hs, n):
    """The second pass over a batch: :func:`tbl_prefetch_found` for each of
    ``hs[0:n]`` that is a hash (-1: a row not looked up), and ``hs[i]`` becomes the
    slot found, the row's *candidate*: where its key is when the first code match is
    it, else the first free slot of its probe path, where it would go (or a slot
    another key holds). A later loop over the rows checks a candidate instead of
    probing again (:func:`tbl_lookup_at`, :func:`tbl_insert_at`); the batch's first
    pass is preceded by :func:`tbl_begin_pass`."""
    for i in range(n):
        if hs[i] >= 0:
            hs[i] = tbl_prefetch_found(state, expires, hs[i])


@inline_kernel
def tbl_prefetch_found_ahead(state, expires, hs, i, n):
    """The second pass spread over the decision loop that uses its candidates:
    called first thing in row ``i``'s iteration, it does for row ``i + AHEAD`` (at
    row 0 also for rows ``0 .. AHEAD - 1``) what :func:`tbl_prefetch_found_rows`
    does for every row, so that row ``i``'s candidate is ready and its record has
    been on its way while the ``AHEAD`` rows before it were decided.

    Why not the whole batch before the loop: a core here keeps few misses in
    flight, so a batch's records (a few hundred misses) then come in waves while the
    core waits, and the decision loop's compute comes on top (143 ns a row where the
    same reads and work with the records prefetched ``AHEAD`` rows ahead take 45:
    ``benchmarks/memory_floor.py``'s ``overlap_*``). Spread out, the misses overlap
    the compute instead.

    A candidate found later in the batch than the first pass is as good: it is the
    key's slot, or the first free slot of its probe path, as the table stood then,
    and :func:`tbl_lookup_at` and :func:`tbl_insert_at` trust a free one only while
    no slot was freed since the first pass (:func:`tbl_begin_pass`)."""
    if i == 0:
        for j in range(min(AHEAD, n)):
            if hs[j] >= 0:
                hs[j] = tbl_prefetch_found(state, expires, hs[j])
    j = i + AHEAD
    if j < n and hs[j] >= 0:
        hs[j] = tbl_prefetch_found(state, expires, hs[j])


@inline_kernel
def _key_eq(keys, slot, key):
    """Slot ``slot`` holds ``key`` (its first words written out: :func:`tbl_hash`)."""
    n = key.shape[0]
    if keys[slot, 0] != key[0]:
        return False
    if n > 1 and keys[slot, 1] != key[1]:
        return False
    if n > 2 and keys[slot, 2] != key[2]:
        return False
    for w in range(3, n):
        if keys[slot, w] != key[w]:
            return False
    return True


@inline_kernel
def _expire(state, info, slot):
    state[slot] = TOMB
    info[I_LIVE] -= 1
    info[I_TOMBS] += 1
    info[I_EXPIRED] += 1
    info[I_CLEAN] = 0


@inline_kernel
def tbl_holds(keys, state, expires, slot, key, now):
    """Slot ``slot`` (>= 0) holds the live entry with ``key``: a lookup's result kept
    from earlier in the batch is still good (it may since have been deleted,
    reclaimed, or reused for another key)."""
    return is_used(state[slot]) and expires[slot] >= now and _key_eq(keys, slot, key)


@kernel
def tbl_lookup(keys, state, expires, info, key, now):
    """Slot of the live entry with ``key``, or -1. Expired entries met are reclaimed."""
    mask = state.shape[0] - 1
    h = tbl_hash(key)
    u = used_code(h)
    s = h & mask
    for _ in range(state.shape[0]):
        st = state[s]
        if st == EMPTY:
            return -1
        if st == u and _key_eq(keys, s, key):
            if expires[s] < now:
                _expire(state, info, s)
                return -1
            return s
        s = (s + 1) & mask
    return -1


# the same, inlined into a hot caller (a lookup per packet: as a call it passes the
# table's arrays field by field)
tbl_lookup_inline = inline_copy(tbl_lookup)


@inline_kernel
def tbl_lookup_at(keys, state, expires, info, key, now, c):
    """:func:`tbl_lookup` of ``key`` given its candidate slot ``c``
    (:func:`tbl_prefetch_found_rows`; -1: none): ``c`` itself when it holds the live
    entry; -1 when ``c`` is free and no slot was freed since the pass
    (``info[I_CLEAN]``); else a lookup.

    Why a free candidate proves the key absent, inserts since the pass included:
    the candidate was then the first free slot of the key's probe path, with no
    code match before the first empty one. The slots before it stay used while none
    is freed, so the first free slot of the path is still the candidate as long as
    it is free, and an insert of the key would have gone there."""
    if c >= 0:
        st = state[c]
        if not is_used(st):
            if info[I_CLEAN] != 0:
                return -1
        elif tbl_holds(keys, state, expires, c, key, now):
            return c
    return tbl_lookup_inline(keys, state, expires, info, key, now)


@inline_kernel
def tbl_hint(state, e, c):
    """What a loop that looked a key up leaves a later one (for
    :func:`tbl_lookup_at`, :func:`tbl_insert_at`): the entry ``e`` it found, else the
    candidate ``c`` when it is free (where the absent key would go), else -1."""
    if e >= 0:
        return e
    if c >= 0 and not is_used(state[c]):
        return c
    return -1


@inline_kernel
def _place(keys, state, bucket, expires, info, key, bkt, exp, s, h):
    """Put the entry of ``key`` (hash ``h``) in the free slot ``s`` (the key's first
    words written out: :func:`tbl_hash`)."""
    if state[s] == TOMB:
        info[I_TOMBS] -= 1
    state[s] = used_code(h)
    n = key.shape[0]
    keys[s, 0] = key[0]
    if n > 1:
        keys[s, 1] = key[1]
    if n > 2:
        keys[s, 2] = key[2]
    for w in range(3, n):
        keys[s, w] = key[w]
    bucket[s] = bkt
    expires[s] = exp
    info[I_LIVE] += 1


@kernel
def tbl_insert(keys, state, bucket, expires, info, key, bkt, exp, now):
    """Slot for a new entry with ``key`` (caller checked it is absent), or -1 when full.

    Takes the first tombstone or empty slot on the probe path, seen in the control
    bytes alone: the slot a run-ahead loop prefetched (:func:`tbl_slot_for`). An
    expired entry on the way stays until a lookup of its key or the sweep reclaims
    it (testing each one's expiry would read a record per slot passed).
    """
    if info[I_LIVE] >= info[I_MAX]:
        return -1
    mask = state.shape[0] - 1
    h = tbl_hash(key)
    s = h & mask
    for _ in range(state.shape[0]):
        if not is_used(state[s]):
            _place(keys, state, bucket, expires, info, key, bkt, exp, s, h)
            return s
        s = (s + 1) & mask
    return -1


# the same, inlined into the kernels that open connections (a conntrack entry, and a
# translated connection's E2, per new flow)
tbl_insert_inline = inline_copy(tbl_insert)


@inline_kernel
def tbl_insert_at(keys, state, bucket, expires, info, key, bkt, exp, now, c):
    """:func:`tbl_insert` given the key's candidate slot ``c`` (-1: none): when ``c``
    is free and no slot was freed since the pass, it is the first free slot of the
    key's probe path (see :func:`tbl_lookup_at`), where :func:`tbl_insert` would put
    it, and it goes there without a probe."""
    if c >= 0 and info[I_CLEAN] != 0 and not is_used(state[c]) \
            and info[I_LIVE] < info[I_MAX]:
        _place(keys, state, bucket, expires, info, key, bkt, exp, c, tbl_hash(key))
        return c
    return tbl_insert_inline(keys, state, bucket, expires, info, key, bkt, exp, now)


@inline_kernel
def tbl_needs_rebuild(state, info):
    """Tombstones fill a quarter of the slots: probes are getting long
    (:meth:`HashTable.needs_rebuild`, for a kernel that tells its ``process`` to
    call :meth:`HashTable.rebuild`: a Python check per table and batch costs about
    0.5 us)."""
    return info[I_TOMBS] * 4 > state.shape[0]


@kernel
def tbl_delete(state, info, slot):
    state[slot] = TOMB
    info[I_LIVE] -= 1
    info[I_TOMBS] += 1
    info[I_CLEAN] = 0


@kernel
def tbl_sweep(state, expires, info, now, budget):
    """Check ``budget`` slots from the cursor on and reclaim expired entries."""
    mask = state.shape[0] - 1
    c = info[I_CURSOR]
    n = 0
    for _ in range(min(budget, state.shape[0])):
        if is_used(state[c]) and expires[c] < now:
            _expire(state, info, c)
            n += 1
        c = (c + 1) & mask
    info[I_CURSOR] = c
    return n


@kernel
def _reinsert(keys, vals, state, bucket, expires, info, okeys, ovals, ostate, obucket,
              oexpires, now):
    for s in range(ostate.shape[0]):
        if is_used(ostate[s]) and oexpires[s] >= now:
            t = tbl_insert(keys, state, bucket, expires, info, okeys[s], obucket[s],
                           oexpires[s], now)
            for w in range(vals.shape[1]):
                vals[t, w] = ovals[s, w]


@kernel
def _import(keys, vals, state, bucket, expires, info, ikeys, ivals, ibucket, iexpires,
            now, newer_only):
    """Insert the given entries or overwrite equal keys (with ``newer_only``: only
    entries that expire later than the one held, and none already expired: the newer
    news wins); returns how many did not fit.

    Entries go in blocks of ``IMPORT_BLOCK``: the home slots of a block are
    prefetched first, in a loop of their own, so that their cache misses (a large
    table's slots are all misses) overlap instead of coming one after the other."""
    failed = 0
    mask = state.shape[0] - 1
    n = ikeys.shape[0]
    for b0 in range(0, n, IMPORT_BLOCK):
        b1 = min(b0 + IMPORT_BLOCK, n)
        for i in range(b0, b1):
            tbl_prefetch(state, expires, tbl_hash(ikeys[i]) & mask)
        for i in range(b0, b1):
            if newer_only and iexpires[i] < now:
                continue
            key = ikeys[i]
            s = tbl_lookup(keys, state, expires, info, key, now)
            if newer_only and s >= 0 and expires[s] >= iexpires[i]:
                continue
            if s < 0:
                s = tbl_insert(keys, state, bucket, expires, info, key, ibucket[i],
                               iexpires[i], now)
                if s < 0:
                    failed += 1
                    continue
            bucket[s] = ibucket[i]
            expires[s] = iexpires[i]
            for w in range(vals.shape[1]):
                vals[s, w] = ivals[i, w]
    return failed


@kernel
def _take(records, state, bucket, expires, want, now, out):
    """Copy the records of live entries whose bucket is wanted into ``out``."""
    k = 0
    for s in range(state.shape[0]):
        if not is_used(state[s]) or expires[s] < now:
            continue
        b = bucket[s]
        if b < 0 or b >= want.shape[0] or not want[b]:
            continue
        if k >= out.shape[0]:
            break
        for w in range(out.shape[1]):
            out[k, w] = records[s, w]
        k += 1
    return k


@kernel
def _remove(state, bucket, expires, info, want, every, now):
    """Delete the live entries whose bucket is wanted (``every``: all of them);
    returns how many."""
    n = 0
    for s in range(state.shape[0]):
        if not is_used(state[s]) or expires[s] < now:
            continue
        b = bucket[s]
        if every or (b >= 0 and b < want.shape[0] and want[b]):
            state[s] = TOMB
            n += 1
    info[I_LIVE] -= n
    info[I_TOMBS] += n
    if n:
        info[I_CLEAN] = 0
    return n


@inline_kernel
def sorted_find(arr, x):
    """Index of ``x`` in the sorted array ``arr``, or -1 (binary search: small sets of
    addresses or MACs that config compiled, looked up per packet)."""
    lo = 0
    hi = arr.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        v = arr[mid]
        if v < x:
            lo = mid + 1
        elif v > x:
            hi = mid
        else:
            return mid
    return -1


class TableFull(RuntimeError):
    """Entries could not be imported because the table is at its limit."""


def record_columns(records: np.ndarray, key_words: int, value_words: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column views of records (a table's, or :meth:`HashTable.take_entries`'):
    expiry (float64), key words, bucket, value words -- the one place their order
    is written (``vxlan_kernel`` slices it too, checked by ``vxlan._records``)."""
    return (records[:, 0].view(np.float64), records[:, 1:1 + key_words],
            records[:, 1 + key_words], records[:, 2 + key_words:2 + key_words + value_words])


def _slots_for(max_entries: int) -> int:
    n = 16
    while n < 2 * max_entries:
        n *= 2
    return n


class HashTable:
    """Bounded hash table of (key words -> value words, bucket, expiry)."""

    def __init__(self, key_words: int, value_words: int, max_entries: int) -> None:
        if key_words <= 0 or value_words <= 0:
            raise ValueError("a table needs at least one key word and one value word")
        if max_entries <= 0:
            raise ValueError(f"table limit must be positive, not {max_entries}")
        self.key_words = key_words
        self.value_words = value_words
        cap = _slots_for(max_entries)
        # One record per slot, cache-line aligned: expiry, key words, bucket, value
        # words. A lookup then touches one or two cache lines, not one per array
        # (with a million flows every one of those is a miss): the first line holds
        # the expiry, the key, the bucket and the first value words -- in conntrack
        # all that a packet of an established UDP or ICMP flow reads, and all that a
        # new one writes (the bucket: every insert writes it). The kernels get column
        # views of it. The slots' control bytes are a dense array of their own (see
        # the module's docstring).
        # Nothing is written here: the zeroed pages stay unallocated until slots are
        # used (a large idle table costs no memory).
        width = (2 + key_words + value_words + 7) // 8 * 8
        raw = np.zeros(cap * width + 8, np.int64)
        off = (-raw.ctypes.data // 8) % 8
        self.records = raw[off:off + cap * width].reshape(cap, width)
        self.state = np.zeros(cap, np.int8)
        # the bucket is meaningful in used slots only
        self.expires, self.keys, self.bucket, self.vals = record_columns(
            self.records, key_words, value_words)
        self.info = np.zeros(NINFO, np.int64)
        self.info[I_MAX] = max_entries

    # -- inspection ------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        return int(self.info[I_MAX])

    @property
    def capacity(self) -> int:
        return self.state.shape[0]

    def __len__(self) -> int:
        """Live entries, counting expired ones not yet reclaimed."""
        return int(self.info[I_LIVE])

    def live(self, now: float) -> np.ndarray:
        """Slot numbers of entries alive at ``now``."""
        return np.flatnonzero(self.used() & (self.expires >= now))

    def used(self) -> np.ndarray:
        """Which slots hold an entry (live or expired, not yet reclaimed)."""
        return (self.state & USED) != 0

    def entries(self, now: float) -> list[tuple[tuple[int, ...], tuple[int, ...], int, float]]:
        """(key, value, bucket, expires) of every live entry, for tests and display."""
        out = []
        for s in self.live(now):
            out.append((tuple(int(x) for x in self.keys[s]),
                        tuple(int(x) for x in self.vals[s]),
                        int(self.bucket[s]), float(self.expires[s])))
        return out

    def get(self, key, now: float) -> np.ndarray | None:
        """The value words of ``key`` (a view), or None."""
        k = np.asarray(key, np.int64).reshape(self.key_words)
        s = tbl_lookup(self.keys, self.state, self.expires, self.info, k, now)
        return None if s < 0 else self.vals[s]

    def put(self, key, value, *, bucket: int = -1, expires: float, now: float) -> None:
        k = np.asarray(key, np.int64).reshape(self.key_words)
        v = np.asarray(value, np.int64).reshape(1, self.value_words)
        failed = _import(self.keys, self.vals, self.state, self.bucket, self.expires,
                         self.info, k.reshape(1, -1), v,
                         np.array([bucket], np.int64), np.array([expires], np.float64),
                         now, False)
        if failed:
            raise TableFull(f"table full ({self.max_entries} entries)")

    # -- upkeep ------------------------------------------------------------------
    def maintain(self, now: float, sweep: int = 64) -> int:
        """Per-batch upkeep: sweep ``sweep`` slots, rebuild if tombstones pile up.

        Returns the number of entries that expired in the sweep.
        """
        n = tbl_sweep(self.state, self.expires, self.info, now, sweep)
        if self.needs_rebuild():
            n += self.rebuild(now)
        return n

    def needs_rebuild(self) -> bool:
        """Tombstones fill a quarter of the slots: probes are getting long (in a
        kernel: :func:`tbl_needs_rebuild`)."""
        return int(self.info[I_TOMBS]) * 4 > self.capacity

    def rebuild(self, now: float) -> int:
        """Re-insert live entries into a clean slot array (drops tombstones).

        Returns how many expired entries it dropped (counted as expired).
        """
        expired = int(np.count_nonzero(self.used() & (self.expires < now)))
        self.info[I_EXPIRED] += expired
        old = (self.keys.copy(), self.vals.copy(), self.state.copy(), self.bucket.copy(),
               self.expires.copy())
        self.state[:] = EMPTY
        self.info[I_LIVE] = 0
        self.info[I_TOMBS] = 0
        self.info[I_CLEAN] = 0
        _reinsert(self.keys, self.vals, self.state, self.bucket, self.expires, self.info,
                  *old, now)
        return expired

    # -- moving state by bucket ---------------------------------------------------
    def select(self, buckets, now: float) -> np.ndarray:
        sel = self.used() & (self.expires >= now)
        if buckets is not None:
            sel &= np.isin(self.bucket, np.asarray(buckets, np.int64))
        return np.flatnonzero(sel)

    def export_buckets(self, buckets, now: float) -> bytes:
        """Entries of the given buckets (all entries if ``buckets`` is None) as bytes."""
        s = self.select(buckets, now)
        buf = io.BytesIO()
        np.savez(buf, shape=np.array([self.key_words, self.value_words], np.int64),
                 keys=self.keys[s], vals=self.vals[s],
                 bucket=self.bucket[s], expires=self.expires[s])
        return buf.getvalue()

    def _want(self, buckets) -> np.ndarray:
        b = np.asarray(buckets, np.int64)
        want = np.zeros(int(b.max(initial=0)) + 1, np.bool_)
        want[b] = True
        return want

    @property
    def record_words(self) -> int:
        """Words of a record :meth:`take_entries` gives: expiry, key, bucket, value."""
        return 2 + self.key_words + self.value_words

    def take_entries(self, buckets, now: float, out: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
        """Live entries of the given buckets as records (their used words; for a
        bucket move between processes: one pass over the slots, one copy, no byte
        format). ``out``: where to put them (``len(self)`` rows of
        :attr:`record_words`, e.g. in a staging area), else a new array."""
        given = out is not None
        if out is None:
            out = np.empty((max(len(self), 0), self.record_words), np.int64)
        k = _take(self.records, self.state, self.bucket, self.expires, self._want(buckets),
                  now, out)
        return {"records": out[:k].copy() if not given and 2 * k < len(out) else out[:k],
                "words": np.array([self.key_words, self.value_words])}

    def put_entries(self, e: dict[str, np.ndarray], now: float) -> int:
        """Insert what :meth:`take_entries` gave (overwriting equal keys)."""
        r = e["records"]
        kw, vw = (int(x) for x in e["words"])
        if (kw, vw) != (self.key_words, self.value_words) or r.ndim != 2 \
                or r.shape[1] < 2 + kw + vw:
            raise ValueError(f"entries of {kw}+{vw} words do not fit a table of "
                             f"{self.key_words}+{self.value_words}")
        # column views of the records (no copies: they may be a staged file's pages)
        rexp, rkeys, rbucket, rvals = record_columns(r, kw, vw)
        failed = _import(self.keys, self.vals, self.state, self.bucket, self.expires,
                         self.info, rkeys, rvals, rbucket, rexp, now, False)
        if failed:
            raise TableFull(f"{failed} of {len(r)} moved entries did not fit "
                            f"(limit {self.max_entries})")
        return len(r)

    def import_entries(self, data: bytes, now: float) -> int:
        """Insert exported entries (overwriting equal keys); returns how many."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            kw, vw = (int(x) for x in z["shape"])
            if (kw, vw) != (self.key_words, self.value_words):
                raise ValueError(f"entries of shape {kw}+{vw} words do not fit a table "
                                 f"of {self.key_words}+{self.value_words}")
            keys, vals = z["keys"], z["vals"]
            failed = _import(self.keys, self.vals, self.state, self.bucket, self.expires,
                             self.info, keys, vals, z["bucket"], z["expires"], now, False)
        if failed:
            raise TableFull(f"{failed} of {len(keys)} imported entries did not fit "
                            f"(limit {self.max_entries})")
        return len(keys)

    def merge_entries(self, data: bytes, now: float) -> int:
        """Fold exported entries of another worker's replica in: a key this table lacks
        is inserted, one it has is overwritten only by an entry that expires later
        (refreshed more recently). Returns the entries offered; entries that find no
        room are skipped (a replica is a cache: the owner still has them)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            kw, vw = (int(x) for x in z["shape"])
            if (kw, vw) != (self.key_words, self.value_words):
                raise ValueError(f"entries of shape {kw}+{vw} words do not fit a table "
                                 f"of {self.key_words}+{self.value_words}")
            keys = z["keys"]
            _import(self.keys, self.vals, self.state, self.bucket, self.expires, self.info,
                    keys, z["vals"], z["bucket"], z["expires"], now, True)
        return len(keys)

    def remove_buckets(self, buckets, now: float) -> int:
        """Delete the entries of the given buckets (after they moved elsewhere); all
        of them with ``buckets`` None."""
        every = buckets is None
        return _remove(self.state, self.bucket, self.expires, self.info,
                       self._want(() if every else buckets), every, now)
