"""The bounded hash table behind all device state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dva.nf.registry import get
from dva.nf.switch import SwitchConfig
from dva.nf.table import (
    HashTable,
    TableFull,
    tbl_begin_pass,
    tbl_delete,
    tbl_hash,
    tbl_insert,
    tbl_lookup,
    tbl_lookup_at,
    tbl_prefetch_ctrl,
    tbl_prefetch_found_rows,
)


def test_put_get_expire_and_limit():
    t = HashTable(2, 3, max_entries=4)
    for k in range(4):
        t.put([k, -k], [k, k * 2, k * 3], bucket=k, expires=100.0 + k, now=0.0)
    assert len(t) == 4
    assert list(t.get([2, -2], now=50.0)) == [2, 4, 6]
    with pytest.raises(TableFull):
        t.put([9, 9], [1, 1, 1], expires=200.0, now=50.0)
    # Entry 0 expires at 100: absent afterwards, and its room is reusable.
    assert t.get([0, 0], now=100.5) is None
    t.put([9, 9], [1, 1, 1], expires=300.0, now=100.5)
    assert list(t.get([9, 9], now=101.0)) == [1, 1, 1]
    assert len(t) == 4


def test_sweep_reclaims_expired_entries_without_lookups():
    t = HashTable(1, 1, max_entries=100)
    for k in range(100):
        t.put([k], [k], expires=10.0, now=0.0)
    expired = 0
    for _ in range(t.capacity // 64 + 1):
        expired += t.maintain(now=20.0, sweep=64)
    assert expired == 100
    assert len(t) == 0


def test_rebuild_keeps_live_entries():
    t = HashTable(1, 1, max_entries=64)
    for k in range(64):
        t.put([k], [k * 7], expires=5.0 if k % 2 else 500.0, now=0.0)
    t.rebuild(now=10.0)
    assert len(t) == 32
    assert all(t.get([k], now=10.0)[0] == k * 7 for k in range(0, 64, 2))
    assert all(t.get([k], now=10.0) is None for k in range(1, 64, 2))


def test_export_import_by_bucket_is_lossless():
    a = HashTable(3, 2, max_entries=1000)
    rng = np.random.default_rng(1)
    entries = {}
    for _ in range(600):
        key = tuple(int(x) for x in rng.integers(-2**62, 2**62, 3))
        val = tuple(int(x) for x in rng.integers(-2**62, 2**62, 2))
        b = int(rng.integers(0, 16))
        exp = float(rng.uniform(10, 20))
        a.put(key, val, bucket=b, expires=exp, now=0.0)
        entries[key] = (val, b, exp)
    moved = {1, 5, 9}
    blob = a.export_buckets(sorted(moved), now=0.0)
    b = HashTable(3, 2, max_entries=1000)
    n = b.import_entries(blob, now=0.0)
    want = {k: v for k, v in entries.items() if v[1] in moved}
    assert n == len(want)
    got = {k: (v, bk, e) for k, v, bk, e in b.entries(now=0.0)}
    assert got == want
    removed = a.remove_buckets(sorted(moved), now=0.0)
    assert removed == len(want)
    assert {k for k, *_ in a.entries(0.0)} == set(entries) - set(want)


def test_import_refuses_what_does_not_fit_and_mismatched_shapes():
    a = HashTable(1, 1, max_entries=10)
    for k in range(10):
        a.put([k], [k], bucket=0, expires=50.0, now=0.0)
    small = HashTable(1, 1, max_entries=5)
    with pytest.raises(TableFull):
        small.import_entries(a.export_buckets([0], 0.0), now=0.0)
    with pytest.raises(ValueError):
        HashTable(2, 1, max_entries=10).import_entries(a.export_buckets([0], 0.0), 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "del", "tick"]), st.integers(0, 40),
                          st.integers(1, 30)), max_size=120))
def test_matches_a_dict_model(ops):
    """Random puts, deletes and time steps agree with a plain dict with expiry."""
    t = HashTable(1, 1, max_entries=24)
    model: dict[int, tuple[int, float]] = {}
    now = 0.0
    for op, k, v in ops:
        live = {kk: vv for kk, vv in model.items() if vv[1] >= now}
        if op == "put":
            if k in live or len(live) < 24:
                t.put([k], [v], expires=now + v, now=now)
                model[k] = (v, now + v)
            else:
                with pytest.raises(TableFull):
                    t.put([k], [v], expires=now + v, now=now)
        elif op == "del":
            s = t.live(now)
            hit = [x for x in s if t.keys[x, 0] == k]
            if hit:
                from dva.nf.table import tbl_delete
                tbl_delete(t.state, t.info, hit[0])
                model.pop(k, None)
        else:
            now += v / 3
            t.maintain(now, sweep=16)
        live = {kk: vv for kk, vv in model.items() if vv[1] >= now}
        got = {key[0]: (val[0], exp) for key, val, _, exp in t.entries(now)}
        assert got == live


def test_switch_state_shares_its_mac_table_and_has_no_flow_state():
    cfg = SwitchConfig(type="switch", ports=["a", "b"], mac_table_size=16)
    dev = get("switch")("sw", cfg)
    s = dev.new_state()
    s.macs.put([(1 << 48) | 0x020000000001], [1], expires=100.0, now=0.0)
    blob = s.export_shared(now=0.0)
    s2 = dev.new_state()
    assert s2.import_shared(blob, now=0.0) == 1
    assert list(s2.macs.get([(1 << 48) | 0x020000000001], now=1.0)) == [1]
    assert s2.import_flows(s.export_flows([0, 1, 2], now=0.0), now=0.0) == 0


def test_prefetching_every_slot_and_past_the_end_changes_nothing():
    """``tbl_prefetch`` asks for a slot's control byte, its record's lines and the
    next record's first one -- for the last slot that is past the array, which a
    prefetch may do (it never faults); ``tbl_prefetch_ctrl`` and
    ``tbl_prefetch_found`` (the two-pass run-ahead) only read the control bytes.
    Lookups after them find what they found before."""
    from dva._jit import kernel
    from dva.nf.table import (
        tbl_hash,
        tbl_lookup,
        tbl_prefetch,
        tbl_prefetch_ctrl,
        tbl_prefetch_found,
    )

    @kernel
    def prefetch_then_look(keys, state, expires, info, qkeys, now, out):
        mask = state.shape[0] - 1
        for s in range(state.shape[0]):
            tbl_prefetch(state, expires, s)
        for i in range(qkeys.shape[0]):
            tbl_prefetch(state, expires, tbl_hash(qkeys[i]) & mask)
            tbl_prefetch_ctrl(state, tbl_hash(qkeys[i]))
        for i in range(qkeys.shape[0]):
            tbl_prefetch_found(state, expires, tbl_hash(qkeys[i]))
        for i in range(qkeys.shape[0]):
            out[i] = tbl_lookup(keys, state, expires, info, qkeys[i], now)

    t = HashTable(2, 1, 100)
    for k in range(100):
        t.put((k, 7 * k), (k,), expires=10.0, now=0.0)
    before, ctrl = t.records.copy(), t.state.copy()
    q = np.array([(k, 7 * k) for k in range(150)], np.int64)
    out = np.zeros(len(q), np.int64)
    prefetch_then_look(t.keys, t.state, t.expires, t.info, q, 1.0, out)
    assert (t.records == before).all() and (t.state == ctrl).all()
    assert [int(t.vals[s, 0]) for s in out[:100]] == list(range(100))
    assert (out[100:] == -1).all()


def test_control_bytes_say_where_a_key_is_or_would_go():
    """Each slot's control byte is EMPTY, TOMB, or the odd code of its key's hash
    (``used_code``); from those bytes alone ``tbl_slot_for`` names the slot a key is
    in, or the one an insert puts it in (the first tombstone or empty slot on its
    path) -- unless an earlier slot's code matches by chance (one in 64), when it
    names that slot, whose key differs."""
    from dva._jit import kernel
    from dva.nf.table import (
        EMPTY,
        TOMB,
        tbl_delete,
        tbl_hash,
        tbl_insert,
        tbl_lookup,
        tbl_slot_for,
        used_code,
    )

    @kernel
    def slot_for(state, key):
        return tbl_slot_for(state, tbl_hash(key))

    @kernel
    def code(key):
        return used_code(tbl_hash(key))

    t = HashTable(2, 1, 400)  # 1024 slots
    keys = [np.array([k, 3 * k + 1], np.int64) for k in range(600)]
    for k in keys[:300]:
        assert tbl_insert(t.keys, t.state, t.bucket, t.expires, t.info, k, 0, 10.0,
                          0.0) >= 0
    for k in keys[:300:3]:  # tombstones on the probe paths
        tbl_delete(t.state, t.info, int(tbl_lookup(t.keys, t.state, t.expires, t.info,
                                                  k, 1.0)))
    assert set(np.unique(t.state)) <= {EMPTY, TOMB} | {((c << 1) | 1) for c in range(64)}
    chance = 0
    for i, k in enumerate(keys):
        s = int(slot_for(t.state, k))
        at = int(tbl_lookup(t.keys, t.state, t.expires, t.info, k, 1.0))
        if at >= 0:  # present: its own slot, with its code
            assert int(t.state[at]) == int(code(k))
            if s != at:
                chance += 1
                assert int(t.state[s]) == int(code(k)) and list(t.keys[s]) != list(k)
            continue
        if t.state[s] & 1:  # absent, and a used slot's code matched by chance
            chance += 1
            assert int(t.state[s]) == int(code(k)) and list(t.keys[s]) != list(k)
            continue
        if i >= 350:
            continue  # keep the table as it is for the keys after
        put = int(tbl_insert(t.keys, t.state, t.bucket, t.expires, t.info, k, 0, 10.0, 0.0))
        assert put == s and int(t.state[s]) == int(code(k))
    assert chance < 40  # about one probe in 64 meets a chance match


def test_a_lookup_from_a_candidate_slot_finds_what_a_lookup_finds():
    """The run-ahead pass leaves each row its candidate slot
    (``tbl_prefetch_found_rows``); ``tbl_lookup_at`` from it agrees with a full
    lookup for every key: present (in the candidate, or past a chance code match),
    absent (an empty candidate, or a tombstone on the path), and expired (reclaimed,
    as a lookup does) -- also with no candidate, or another key's slot."""
    from dva._jit import kernel
    from dva.nf.table import EMPTY

    @kernel
    def candidates(state, expires, info, qkeys, hs):
        tbl_begin_pass(info)
        for i in range(qkeys.shape[0]):
            hs[i] = tbl_hash(qkeys[i])
            tbl_prefetch_ctrl(state, hs[i])
        tbl_prefetch_found_rows(state, expires, hs, qkeys.shape[0])

    @kernel
    def lookup_at(keys, state, expires, info, key, now, c):
        return tbl_lookup_at(keys, state, expires, info, key, now, c)

    t = HashTable(2, 1, 500)  # 1024 slots
    qkeys = np.array([[k, 5 * k + 2] for k in range(700)], np.int64)
    for i, k in enumerate(qkeys[:420]):
        exp = 1.5 if i % 7 == 0 else 10.0  # some expire before the lookups at 2.0
        assert tbl_insert(t.keys, t.state, t.bucket, t.expires, t.info, k, 0, exp,
                          0.0) >= 0
    for k in qkeys[1:420:5]:  # tombstones on the probe paths
        tbl_delete(t.state, t.info, int(tbl_lookup(t.keys, t.state, t.expires, t.info,
                                                  k, 1.0)))
    hs = np.zeros(len(qkeys), np.int64)
    candidates(t.state, t.expires, t.info, qkeys, hs)
    ref = t.state.copy(), t.info.copy()
    want = [int(tbl_lookup(t.keys, t.state, t.expires, t.info, k, 2.0)) for k in qkeys]
    assert sum(w >= 0 for w in want) > 250 and sum(w < 0 for w in want) > 250
    reclaimed = t.info.copy()
    t.state[:], t.info[:] = ref  # the expired entries back, for the lookups from hints
    kinds = set()
    for i, k in enumerate(qkeys):
        c = int(hs[i])
        other = next(w for w in want[i + 1:] + want if w >= 0 and w != want[i])
        for hint in (c, -1, other):  # its candidate, none, another key's slot
            got = int(lookup_at(t.keys, t.state, t.expires, t.info, k, 2.0, hint))
            assert got == want[i], (i, hint, got, want[i])
        kinds.add("empty" if t.state[c] == EMPTY else
                  "own" if c == want[i] else "other")
    assert kinds == {"empty", "own", "other"}
    assert list(t.info) == list(reclaimed)  # the same expired entries reclaimed


@pytest.mark.parametrize("seed", range(6))
def test_lookups_and_inserts_from_candidates_build_the_same_table(seed):
    """A device's decision loop looks each row's key up from its candidate and
    inserts the absent ones there (``tbl_lookup_at``, ``tbl_insert_at``), with
    inserts and deletions between the rows of a batch: repeated keys, keys whose
    candidate another row's insert took, entries expired (reclaimed by a lookup)
    and connections deleted mid-batch. Every answer, slot and control byte must be
    what plain lookups and inserts give, in the same order, on a copy of the
    table; and while nothing is freed the candidates spare most probes."""
    from dva._jit import kernel
    from dva.nf.table import I_CLEAN, tbl_insert_at

    @kernel
    def batch(keys, state, bucket, expires, info, qkeys, dels, hs, out, clean, now):
        tbl_begin_pass(info)
        for i in range(qkeys.shape[0]):
            hs[i] = tbl_hash(qkeys[i])
            tbl_prefetch_ctrl(state, hs[i])
        tbl_prefetch_found_rows(state, expires, hs, qkeys.shape[0])
        for i in range(qkeys.shape[0]):
            clean[i] = info[I_CLEAN]
            s = tbl_lookup_at(keys, state, expires, info, qkeys[i], now, hs[i])
            if s < 0:
                s = tbl_insert_at(keys, state, bucket, expires, info, qkeys[i], i, 9.0,
                                  now, hs[i])
            elif dels[i]:
                tbl_delete(state, info, s)
            out[i] = s

    @kernel
    def plain(keys, state, bucket, expires, info, qkeys, dels, out, now):
        for i in range(qkeys.shape[0]):
            s = tbl_lookup(keys, state, expires, info, qkeys[i], now)
            if s < 0:
                s = tbl_insert(keys, state, bucket, expires, info, qkeys[i], i, 9.0, now)
            elif dels[i]:
                tbl_delete(state, info, s)
            out[i] = s

    rng = np.random.default_rng(seed)
    t = HashTable(2, 1, 900)  # 2048 slots
    universe = np.array([[k, 3 * k + 1] for k in range(1500)], np.int64)
    stale = np.zeros(1500, bool)
    for j in rng.choice(1500, 700, replace=False):
        stale[j] = rng.random() < 0.1  # expired at 2.0
        tbl_insert(t.keys, t.state, t.bucket, t.expires, t.info, universe[j], 0,
                   1.5 if stale[j] else 9.0, 0.0)
    for k in universe[rng.choice(1500, 150, replace=False)]:  # tombstones on the paths
        s = tbl_lookup(t.keys, t.state, t.expires, t.info, k, 1.0)
        if s >= 0:
            tbl_delete(t.state, t.info, s)
    ref = HashTable(2, 1, 900)
    ref.records[:], ref.state[:], ref.info[:] = t.records, t.state, t.info
    spared = 0
    for b in range(8):  # batches of 256 rows, a quarter of them repeats
        # the first four with expired keys and deletions, the last four with
        # neither: nothing is freed there, every row may use its candidate
        q = universe[rng.choice(np.flatnonzero(~stale) if b >= 4 else 1500, 256)]
        q[192:] = q[rng.integers(0, 192, 64)]
        dels = (rng.random(256) < (0.0 if b >= 4 else 0.02)).astype(np.int64)
        hs, got, want = (np.zeros(256, np.int64) for _ in range(3))
        clean = np.zeros(256, np.int64)
        batch(t.keys, t.state, t.bucket, t.expires, t.info, q, dels, hs, got, clean, 2.0)
        plain(ref.keys, ref.state, ref.bucket, ref.expires, ref.info, q, dels, want, 2.0)
        assert list(got) == list(want)
        assert (t.state == ref.state).all() and (t.records == ref.records).all()
        assert list(t.info[:5]) == list(ref.info[:5])
        if b >= 4:
            spared += int(clean.sum())
        else:
            assert clean.min() == 0  # a freed slot ended the shortcut
    assert spared == 4 * 256

    # the case a free candidate cannot decide once a slot was freed: three keys of
    # one home slot, two of them in the table; the first row deletes the first key,
    # whose slot, before the third key's candidate, its insert then takes (not the
    # candidate), where its repeat must find it
    home = np.array([int(tbl_hash(k)) & 4095 for k in universe])
    t = HashTable(2, 1, 2000)  # 4096 slots, empty
    groups = {}
    for j in rng.permutation(1500):
        groups.setdefault(home[j], []).append(j)
    k1, k2, k3 = universe[next(g for g in groups.values() if len(g) >= 3)[:3]]
    for k in (k1, k2):
        tbl_insert(t.keys, t.state, t.bucket, t.expires, t.info, k, 0, 9.0, 0.0)
    ref = HashTable(2, 1, 2000)
    ref.records[:], ref.state[:], ref.info[:] = t.records, t.state, t.info
    q = np.array([k1, k3, k3, k2], np.int64)
    dels = np.array([1, 0, 0, 0], np.int64)
    hs, got, want, clean = (np.zeros(4, np.int64) for _ in range(4))
    batch(t.keys, t.state, t.bucket, t.expires, t.info, q, dels, hs, got, clean, 2.0)
    plain(ref.keys, ref.state, ref.bucket, ref.expires, ref.info, q, dels, want, 2.0)
    assert list(got) == list(want) and want[1] == want[2] == want[0]
    assert (t.state == ref.state).all() and (t.records == ref.records).all()

def test_connection_records_stay_within_their_cache_lines():
    """With a million flows every packet's record misses the caches, and each line of
    it costs a fetch: a connection record is 2 lines, the firewall's, the NAT's and
    the LB's (they keep only the tuple their key does not give: dva.nf.xlat). A word added to conntrack or xlat that crosses a line shows
    here, not only as a slower benchmark."""
    from dva.nf.conntrack import Conntrack
    from dva.nf.lb import LbState
    from dva.nf.nat import NatState

    def lines(t):
        assert t.records.ctypes.data % 64 == 0  # records start on a line
        return t.records.strides[0] // 64

    assert lines(Conntrack(16).table) == 2
    nat = get("nat").config_model.model_validate(
        {"type": "nat", "ports": ["inside", "outside"], "snat": {"to": "198.51.100.2"}})
    assert lines(NatState(nat).ct.table) == 2
    lb = get("lb").config_model.model_validate(
        {"type": "lb", "ports": ["front", "back"],
         "vips": {"web": {"addr": "203.0.113.10", "proto": "tcp", "port": 80,
                          "backends": [{"addr": "10.0.1.1"}]}}})
    assert lines(LbState(lb).ct.table) == 2


def test_a_udp_flow_reads_and_creates_only_its_records_first_line():
    """The run-ahead fetches only the first line of a UDP row's entry
    (``table.HOT_ONLY``), present or new, for the firewall, the NAT and the lb: the
    words their per-packet path reads there and a new entry writes (expiry, key,
    bucket, conntrack's flags with the device's aux, the device's words: the NAT's
    other tuple and its kind, ports and refresh time) must all lie in it, and TCP's
    state and windows outside it."""
    from dva.nf.conntrack import (
        DEVICE_WORDS,
        FIRST_WORDS,
        V_END,
        V_FLAGS,
        V_MAXEND,
        V_MAXWIN,
        V_SCALE,
        V_STATE,
        V_USER,
        Conntrack,
    )
    from dva.nf.xlat import NUSER, U_META, U_X

    t = Conntrack(16, user_words=NUSER).table
    base = t.records.ctypes.data

    def word(a, col=None):
        view = a if col is None else a[:, col]
        return (view.ctypes.data - base) // 8

    first = {word(t.expires), *(word(t.keys, k) for k in range(t.key_words)),
             word(t.bucket), word(t.vals, V_FLAGS),
             *(word(t.vals, V_USER + k) for k in range(DEVICE_WORDS)),
             word(t.vals, U_X), word(t.vals, U_X + 1), word(t.vals, U_META)}
    second = {word(t.vals, v) for v in (V_STATE, V_END, V_MAXEND, V_MAXWIN, V_SCALE)}
    assert max(first) < 8 and min(second) >= 8 and len(first) == 8
    assert FIRST_WORDS == V_USER + DEVICE_WORDS and NUSER == DEVICE_WORDS
    with pytest.raises(ValueError, match="3 words"):
        Conntrack(16, user_words=DEVICE_WORDS + 1)


def test_a_kept_lookup_result_is_trusted_only_while_the_slot_still_holds_the_key():
    """``tbl_holds``: the decision loops of nat and lb start from the slot their
    run-ahead lookup found earlier in the batch; between the two the entry may have
    expired, been deleted, or its slot reused for another key."""
    from dva._jit import kernel
    from dva.nf.table import tbl_delete, tbl_holds, tbl_lookup

    @kernel
    def holds(keys, state, expires, slot, key, now):
        return tbl_holds(keys, state, expires, slot, key, now)

    t = HashTable(2, 1, 16)
    a, b = np.array([1, 2], np.int64), np.array([3, 4], np.int64)
    t.put(a, (7,), expires=10.0, now=0.0)
    s = int(tbl_lookup(t.keys, t.state, t.expires, t.info, a, 1.0))
    assert s >= 0 and holds(t.keys, t.state, t.expires, s, a, 1.0)
    assert not holds(t.keys, t.state, t.expires, s, b, 1.0)  # reused for another key
    assert not holds(t.keys, t.state, t.expires, s, a, 10.5)  # expired since
    tbl_delete(t.state, t.info, s)
    assert not holds(t.keys, t.state, t.expires, s, a, 1.0)  # deleted since


def _ref_hash(words) -> int:
    """tbl_hash in exact integers: bits 32..63 of each product modulo 2**64."""
    h = 0x2545F491
    for w in words:
        h = (((h ^ int(w)) * 0x5851F42D4C957F2D) % (1 << 64)) >> 32
    return h


def test_the_hash_wraps_where_the_compiler_knows_the_keys_ranges():
    """numba tells LLVM that signed multiplies never overflow. A kernel that built
    its keys inline from values of known ranges (benchmarks/stateful.py's batched
    conntrack steps: addresses 10.x.y.z, ports 1024 + f % 16) then got one hash,
    0x7FFFFFFF, for every key -- its multiplies certainly overflow, so LLVM folded
    them. tbl_hash multiplies unsigned: the hashes are the reference's."""
    from dva._jit import kernel
    from dva.nf.conntrack import KEY_WORDS, ct_make_key

    @kernel
    def hashes(ids, key, out):
        for i in range(ids.shape[0]):
            f = ids[i]
            ct_make_key(key, 0, 17, 0x0A000000 | (f >> 4), 1024 + (f & 15),
                        0xC0000209, 53)
            out[i] = tbl_hash(key)

    ids = np.arange(64, dtype=np.int64)
    out = np.zeros(64, np.int64)
    key = np.zeros(KEY_WORDS, np.int64)
    hashes(ids, key, out)
    want = []
    for f in range(64):
        ct_make_key(key, 0, 17, 0x0A000000 | (f >> 4), 1024 + (f & 15), 0xC0000209, 53)
        want.append(_ref_hash(key))
    assert out.tolist() == want and len(set(want)) == 64
    assert tbl_hash(np.array([-5, 7, 1 << 62], np.int64)) == _ref_hash([-5, 7, 1 << 62])
