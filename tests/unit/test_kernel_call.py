"""KernelCall: calls that type their arguments once give what numba's dispatcher
gives, refuse arguments of other types (the suite runs with the check on), and
belong to one device and state."""

from __future__ import annotations

import numpy as np
import pytest

import dva._jit as jit
from dva._jit import KernelCall, kernel
from dva.nf.registry import get


@kernel
def _add_rows(out, rows, n, scale):
    """out[i] += rows[i, 0] * scale for i < n; returns the sum added."""
    s = 0.0
    for i in range(n):
        v = rows[i, 0] * scale
        out[i] += v
        s += v
    return s


def test_calls_give_what_the_dispatcher_gives_and_skip_its_typing():
    out_a, out_b = np.zeros(8), np.zeros(8)
    rows = np.arange(16, dtype=np.int64).reshape(8, 2)
    call = KernelCall(_add_rows)
    for n, scale in ((3, 1.0), (8, 0.5), (0, 2.0), (5, -1.5)):
        assert call(out_a, rows, n, scale) == _add_rows(out_b, rows, n, scale)
    assert np.array_equal(out_a, out_b)
    if jit.JIT_ENABLED:  # after the first call, straight to the compiled code
        assert call._entry is not None
        assert call.target is (call if jit.CHECK_CALLS else call._entry)


@pytest.mark.skipif(not jit.JIT_ENABLED, reason="the check guards compiled code")
def test_arguments_of_another_type_are_refused_before_the_kernel_runs(monkeypatch):
    monkeypatch.setattr(jit, "CHECK_CALLS", True)
    out = np.zeros(4)
    rows = np.ones((4, 2), np.int64)
    call = KernelCall(_add_rows)
    call(out, rows, 4, 1.0)
    before = out.copy()
    with pytest.raises(TypeError, match="argument 1"):
        call(out, rows.astype(np.int32), 4, 1.0)
    with pytest.raises(TypeError, match="argument 1"):  # a column view: layout A
        call(out, np.ones((4, 3), np.int64)[:, 1:], 4, 1.0)
    with pytest.raises(TypeError, match="argument 3"):
        call(out, rows, 4, 1)
    assert np.array_equal(out, before)
    # a row is C- and F-contiguous: numba types it C, as the rows above
    call(out[:1], rows[:1], 1, 1.0)
    assert out[0] == before[0] + 1.0


def test_a_state_keeps_calls_per_device():
    cls = get("nat")
    cfg = cls.config_model.model_validate(
        {"type": "nat", "ports": ["inside", "outside"], "snat": {"to": "198.51.100.2"}})
    a, b = cls("a", cfg), cls("b", cfg)
    st = a.new_state()
    call = st.kernel_call(a, _add_rows)
    assert st.kernel_call(a, _add_rows) is call
    other = st.kernel_call(b, _add_rows)  # a reload that carried the state
    assert other is not call
    assert st.kernel_call(b, _add_rows) is other


def test_kept_arguments_belong_to_one_device_and_fit_the_batch():
    """``DeviceState.bound`` keeps a kernel's unchanging arguments with its call: the
    same tuple for the next batch, new ones for another device given the state (a
    reload that carried it) and for a batch its scratch arrays are too short for."""
    cls = get("nat")
    cfg = cls.config_model.model_validate(
        {"type": "nat", "ports": ["inside", "outside"], "snat": {"to": "198.51.100.2"}})
    a, b = cls("a", cfg), cls("b", cfg)
    st = a.new_state()
    built = []

    def build(state, rows):
        built.append(rows)
        scratch = state.scratch(rows, "rows")
        return (scratch,), len(scratch)

    call, args = st.bound(a, _add_rows, build, 10)
    assert st.bound(a, _add_rows, build, 256) == (call, args) and built == [10]
    assert call is st._call_of(a, _add_rows)
    call_b, args_b = st.bound(b, _add_rows, build, 10)
    assert call_b is not call and built == [10, 10]
    _, big = st.bound(b, _add_rows, build, 1000)
    assert built == [10, 10, 1000] and big[0].shape[0] >= 1000


def test_a_nat_translates_a_batch_larger_than_its_first():
    """The NAT's kept scratch array grows with the batch: a batch of 600 rows after
    one of 1 translates every row (a short array would leave rows without their
    candidate slot, or write past it)."""
    from rig import Rig

    from dva.packet.build import UDP, Eth, IPv4

    rig = Rig("""
appliance: t
devices:
  nat: {type: nat, ports: [inside, outside], snat: {to: 198.51.100.2}}
attach: {nat.inside: {memory: in}, nat.outside: {memory: out}}
""", slots=2048)

    def frames(k0, k):
        return [bytes(Eth(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
                      / IPv4(src=f"10.0.{i // 250}.{i % 250 + 1}", dst="192.0.2.9")
                      / UDP(sport=1000 + i, dport=53)) for i in range(k0, k0 + k)]

    assert len(rig.send("inside", frames(0, 1), 1.0)["outside"]) == 1
    out = rig.send("inside", frames(1, 600), 1.1)["outside"]
    assert len(out) == 600
    assert all(f[26:30] == bytes([198, 51, 100, 2]) for f in out)
    assert rig.counters()["nat snat_flows"] == 601
    rig.check()
