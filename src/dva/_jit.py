"""The one place that decides how hot loops are compiled.

Every per-packet kernel in dva is decorated with :func:`kernel`. With numba's JIT on
(the default) it is an ``njit(cache=True)`` function; with ``NUMBA_DISABLE_JIT=1`` in
the environment numba hands back the plain Python function, which is the readable
reference the differential tests compare against. Kernels are therefore written in
the subset of Python that means the same in both modes: array reads are wrapped in
``int()`` so that numpy's fixed-width scalar arithmetic never differs from numba's
int64 arithmetic, and 32-bit results are masked explicitly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _cache_dir() -> Path:
    """A numba cache folder keyed by the content of every dva source file.

    numba keys a cached kernel by its own file only, so a kernel that calls one in
    another module keeps running stale code after that module changes. One folder per
    source state makes every change compile afresh; the newest few folders are kept.
    """
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dva"
    here = root / f"numba-{h.hexdigest()[:16]}"
    try:
        old = sorted((d for d in root.glob("numba-*") if d != here),
                     key=lambda d: d.stat().st_mtime)[:-3]
        for d in old:
            shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass
    return here


_OWN_CACHE = "NUMBA_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["NUMBA_CACHE_DIR"] = str(_cache_dir())

import numba  # noqa: E402

if _OWN_CACHE:  # numba may have been imported (and read its config) before dva
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

JIT_ENABLED = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")


def inline_kernel(fn):
    """A :func:`kernel` inlined into its callers by numba (small per-packet helpers).

    Calls between cached kernels are real calls that pass every array argument as a
    7-word struct; for helpers run on every packet that costs more than their work.

    Caution, seen with numba 0.68: do not inline a function that branches on an
    argument which the caller assigns in more than one place (``alen = 16`` here,
    ``alen = 4`` there). numba's dead-branch pruning then treated one assignment as a
    constant and compiled the wrong branch (``flow_lin`` inlined into the ICMP-error
    hash of IPv6 gave the IPv4 result); the reference differs, so the differential
    tests catch it.
    """
    if not JIT_ENABLED:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, _nrt=False, inline="always")(fn)
    except (TypeError, KeyError):  # pragma: no cover
        return numba.njit(cache=True, nogil=True, inline="always")(fn)


def inline_copy(fn):
    """An inlined copy of the compiled :func:`kernel` ``fn``, for a hot caller.

    A kernel called from another kernel is a real call that passes every array
    argument field by field; a caller that runs it on every packet (a table lookup, a
    re-parse) can take this copy instead, compiled from the same source and inlined
    into the caller (not cached on its own: the cache entries of ``fn``'s module stay
    the originals'). With the JIT off it is ``fn`` itself.
    """
    if not JIT_ENABLED:
        return fn
    src = getattr(fn, "py_func", fn)
    try:
        return numba.njit(nogil=True, _nrt=False, inline="always")(src)
    except (TypeError, KeyError):  # pragma: no cover
        return numba.njit(nogil=True, inline="always")(src)


def kernel(fn):
    """Compile ``fn`` as a cached, GIL-free numba kernel (or leave it as Python).

    Kernels are compiled without numba's reference-counting runtime (NRT): every
    array view a kernel takes per packet (a frame, a metadata row) otherwise costs an
    out-of-line NRT_incref/NRT_decref call, which made the parser 3.6x slower
    (229 -> 63 ns per packet, docs/benchmarks.md). The price: a kernel must not
    allocate arrays (no np.empty, no .copy()); callers pass scratch arrays instead.
    ``_nrt`` is a private numba option: if a numba release drops it, kernels still
    compile, only slower.
    """
    return _njit(fn)


def _njit(fn):
    try:
        return numba.njit(cache=True, nogil=True, _nrt=False)(fn)
    except (TypeError, KeyError):  # pragma: no cover - numba without the option
        return numba.njit(cache=True, nogil=True)(fn)


if JIT_ENABLED:
    import numpy as np

    @numba.njit(inline="always", cache=True)
    def i64(x):
        """Widen an array element to a signed 64-bit int before arithmetic.

        numba's ``int()`` keeps ``uint8`` as ``uint8``, whose shifts type as unsigned
        and whose unification with int64 gives float64; numpy scalars overflow where
        Python ints do not. Reading through ``i64`` gives int64 when compiled and an
        exact Python int in the reference, and both agree on every masked result.
        """
        return np.int64(x)

    @numba.njit(inline="always", cache=True)
    def u64(x):
        """``x`` as an unsigned 64-bit int, for arithmetic that must wrap modulo
        2**64 (a hash's multiply). numba marks signed adds and multiplies as never
        overflowing (LLVM's ``nsw``): where LLVM can prove a product overflows (a
        key built from values of known ranges, inlined) it may fold it to anything.
        Unsigned ones wrap. In the reference, an exact int reduced modulo 2**64."""
        return np.uint64(x)
else:
    i64 = int

    def u64(x):
        return x & 0xFFFFFFFFFFFFFFFF


# -- big-endian loads and stores ---------------------------------------------------------
#
# Header fields are read and written as single unaligned loads/stores with a byte swap
# when compiled: numba's byte-by-byte reads and shifts cost about a nanosecond per
# byte, and a frame's fields are at arbitrary (unaligned) offsets. Each intrinsic
# takes a ``uint8`` array and an offset; no bounds check, like any kernel indexing.

if JIT_ENABLED:
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cg
    from numba.core import types as _t
    from numba.extending import intrinsic as _intrinsic

    def _pointer(context, builder, sig, args, bits):
        aty, oty = sig.args[0], sig.args[1]
        ary = context.make_array(aty)(context, builder, args[0])
        off = context.cast(builder, args[1], oty, _t.intp)
        ptr = _cg.get_item_pointer(context, builder, aty, ary, [off], wraparound=False)
        return builder.bitcast(ptr, _ir.IntType(bits).as_pointer())

    def _loader(bits):
        def load(typingctx, arr, off):
            if not isinstance(arr, _t.Array) or arr.dtype != _t.uint8 or arr.ndim != 1:
                return None
            sig = _t.int64(arr, off)

            def codegen(context, builder, sig, args):
                v = builder.load(_pointer(context, builder, sig, args, bits), align=1)
                if bits > 8:
                    v = builder.bswap(v)
                return builder.zext(v, _ir.IntType(64))
            return sig, codegen
        load.__name__ = f"load_be{bits}"
        return _intrinsic(load)

    def _storer(bits):
        def store(typingctx, arr, off, value):
            if not isinstance(arr, _t.Array) or arr.dtype != _t.uint8 or arr.ndim != 1:
                return None
            sig = _t.void(arr, off, value)

            def codegen(context, builder, sig, args):
                v = context.cast(builder, args[2], sig.args[2], _t.int64)
                v = builder.trunc(v, _ir.IntType(bits))
                if bits > 8:
                    v = builder.bswap(v)
                builder.store(v, _pointer(context, builder, sig, args, bits), align=1)
                return context.get_dummy_value()
            return sig, codegen
        store.__name__ = f"store_be{bits}"
        return _intrinsic(store)

    load_be16, load_be32, load_be64 = _loader(16), _loader(32), _loader(64)
    store_be16, store_be32, store_be64 = _storer(16), _storer(32), _storer(64)


# -- acquire loads and release stores ------------------------------------------------
#
# The rings between processes (dva.packet.ring) publish descriptors with a release
# store of the producer index and read them after an acquire load of it: the
# compiler may not move the descriptor writes after the index store (or the reads
# before the load), whatever the CPU's own ordering. On x86 both compile to plain
# moves; the ordering they buy is the compiler's. The reference (JIT off) runs in
# the interpreter, which keeps program order.

if JIT_ENABLED:
    def _word_pointer(context, builder, sig, args):
        aty, oty = sig.args[0], sig.args[1]
        ary = context.make_array(aty)(context, builder, args[0])
        off = context.cast(builder, args[1], oty, _t.intp)
        return _cg.get_item_pointer(context, builder, aty, ary, [off], wraparound=False)

    @_intrinsic
    def load_acquire(typingctx, arr, off):
        """``arr[off]`` of an int64 array, loaded with acquire ordering."""
        if not isinstance(arr, _t.Array) or arr.dtype != _t.int64 or arr.ndim != 1:
            return None
        sig = _t.int64(arr, off)

        def codegen(context, builder, sig, args):
            return builder.load_atomic(_word_pointer(context, builder, sig, args),
                                       ordering="acquire", align=8)
        return sig, codegen

    @_intrinsic
    def store_release(typingctx, arr, off, value):
        """``arr[off] = value`` on an int64 array, stored with release ordering."""
        if not isinstance(arr, _t.Array) or arr.dtype != _t.int64 or arr.ndim != 1:
            return None
        sig = _t.void(arr, off, value)

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[2], sig.args[2], _t.int64)
            builder.store_atomic(v, _word_pointer(context, builder, sig, args),
                                 ordering="release", align=8)
            return context.get_dummy_value()
        return sig, codegen
else:
    def load_acquire(arr, off):
        return int(arr[off])

    def store_release(arr, off, value):
        arr[off] = value


# -- software prefetch ---------------------------------------------------------------
#
# A lookup in a table much larger than the caches misses on every slot. Touching each
# row's slot in a loop of its own before the decision loop overlaps those misses,
# but only as many as the core's reorder window holds: a plain load waits there until
# its line arrives, and with the key building and hashing between two loads (about a
# hundred instructions per packet) only two or three misses were in flight at once
# (the firewall's touch loop cost 113 ns per packet with a million flows). A prefetch
# instruction leaves the window at once: the line fill buffers, not the window, bound
# the misses in flight (the same loop: 32 ns per packet). With the JIT off it does
# nothing.

if JIT_ENABLED:
    @_intrinsic
    def prefetch(typingctx, arr, idx, off):
        """Ask for the cache line at byte ``off`` from ``&arr[idx]`` (a 1-D array of
        any dtype, e.g. a table's column view: its rows are the records); no bounds
        check, and no fault on any address."""
        if not isinstance(arr, _t.Array) or arr.ndim != 1:
            return None
        sig = _t.void(arr, idx, off)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i = context.cast(builder, args[1], sig.args[1], _t.intp)
            ptr = _cg.get_item_pointer(context, builder, sig.args[0], ary, [i],
                                       wraparound=False)
            o = context.cast(builder, args[2], sig.args[2], _t.intp)
            p8 = builder.gep(builder.bitcast(ptr, _ir.IntType(8).as_pointer()), [o])
            i32 = _ir.IntType(32)
            fnty = _ir.FunctionType(_ir.VoidType(), [p8.type, i32, i32, i32])
            fn = _cg.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # read, keep in every cache level, data cache
            builder.call(fn, [p8, _ir.Constant(i32, 0), _ir.Constant(i32, 3),
                              _ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return sig, codegen
else:
    def prefetch(arr, idx, off):
        return None


# -- calls without re-typing ---------------------------------------------------------
#
# numba's dispatcher types every argument of every call to choose the compiled code
# (about 25 ns per argument here), then converts it (about 10 ns per array). A
# device's kernel takes 20 to 30 arguments: typing them once saves 0.25 to 0.37 us
# per call, about 1 ns per packet at batch 256 (benchmarks/call_cost.py). A call site
# whose arguments keep their types can type them once.

CHECK_CALLS = os.environ.get("DVA_CHECK_CALLS", "0") not in ("", "0")


def _fingerprint(a):
    """What numba's type of argument ``a`` depends on, cheaply (for the checks)."""
    import numpy as np
    if isinstance(a, np.ndarray):
        f = a.flags  # numba's layout: C before F (a row or an empty array is both)
        layout = "C" if f.c_contiguous else "F" if f.f_contiguous else "A"
        return a.dtype, a.ndim, layout, f.writeable, f.aligned
    if isinstance(a, (bool, np.bool_)):
        return bool
    if isinstance(a, (int, np.integer)):
        return int
    if isinstance(a, (float, np.floating)):
        return float
    return type(a)


class KernelCall:
    """Calls of kernel ``fn`` from one place whose arguments have the same numba
    types every time (the same arrays, or arrays allocated alike; ints; floats): the
    first call goes through numba's dispatcher, the next ones straight to the
    compiled code it chose, without typing the arguments again.

    The owner of a ``KernelCall`` keeps that promise: e.g. a device state keeps one
    per device and kernel (:meth:`dva.nf.base.DeviceState.kernel_call`), whose
    arrays are allocated once, or again with the same dtype and dimensions. Compiled
    code given an array of another type would misread it, so with
    ``DVA_CHECK_CALLS=1`` in the environment (the test suite sets it) every call
    checks its arguments against the first call's and a change raises
    ``TypeError``. When the dispatcher converted an argument (no compiled code has
    exactly the arguments' types), every call goes through it. With the JIT off this
    just calls ``fn``.

    Call ``target``, not the object: it is the compiled code itself once known
    (checks off), so that a call pays no Python layer of its own (a layer passing 30
    arguments on costs about as much as the typing saved); else this object.
    """

    __slots__ = ("fn", "target", "_entry", "_prints")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.target = self
        self._entry = None
        self._prints = None

    def __call__(self, *args):
        entry = self._entry
        if entry is None:
            return self._first(args)
        if CHECK_CALLS:
            self._check(args)
        return entry(*args)

    def _first(self, args):
        out = self.fn(*args)
        overloads = getattr(self.fn, "overloads", None)
        if overloads is not None and self._prints is None:
            self._prints = tuple(_fingerprint(a) for a in args)
            compiled = overloads.get(tuple(self.fn.typeof_pyval(a) for a in args))
            if compiled is not None:
                self._entry = compiled.entry_point
                if not CHECK_CALLS:
                    self.target = self._entry
        return out

    def _check(self, args):
        prints = tuple(_fingerprint(a) for a in args)
        if prints != self._prints:
            changed = [f"argument {i}: {a} -> {b}" for i, (a, b) in
                       enumerate(zip(self._prints, prints)) if a != b]
            raise TypeError(f"{self.fn.__name__} called with other argument types "
                            f"than at its first call: {', '.join(changed)}")
