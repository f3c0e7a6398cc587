"""The staging of moved flow state (dva.worker.stage): buffers written in place in a
worker's staging area travel as offsets, others through the per-move file."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dva.worker import stage


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "area"), str(tmp_path / "move")


def test_buffers_in_the_area_are_not_copied_and_read_back_equal(paths):
    area_path, move = paths
    a = stage.Area(area_path)
    room = a.reserve(8 * 3000).view(np.int64)
    recs = room[:3000].reshape(1000, 3)
    recs[:] = np.arange(3000).reshape(1000, 3)
    other = np.arange(50, dtype=np.int64)  # not in the area: goes through the file
    obj = {"t": {"records": recs, "words": np.array([1, 1])}, "x": other}
    head, places, ap = stage.write(obj, move, a)
    assert ap == area_path
    inside = [p for p in places if p[0]]
    assert [n for _, _, n in inside] == [recs.nbytes]
    # the move's file holds only what was outside the area
    assert os.path.getsize(move) == sum(n for i, _, n in places if not i)
    assert os.path.getsize(move) < recs.nbytes
    got = stage.read(head, places, ap, move)
    assert (got["t"]["records"] == recs).all() and (got["x"] == other).all()
    assert (got["t"]["words"] == [1, 1]).all()


def test_the_area_is_kept_and_grows_only_when_a_move_needs_more(paths):
    area_path, _ = paths
    a = stage.Area(area_path)
    a.reserve(1000)
    mm, size = a.mm, a.size
    a.reserve(size)  # as much again: the same file and mapping
    assert a.mm is mm and os.path.getsize(area_path) == size
    big = a.reserve(size + 1)
    assert a.size > size and os.path.getsize(area_path) == a.size
    big[-1] = 7  # the whole of what reserve gave is usable
    # a view of the old mapping stays valid while it lives
    assert stage.area(area_path) is stage.area(area_path)


def test_without_an_area_everything_goes_through_the_file(paths):
    _, move = paths
    arr = np.arange(10_000, dtype=np.int64)
    head, places, ap = stage.write({"a": arr}, move)
    assert ap is None and [i for i, _, _ in places] == [False]
    assert (stage.read(head, places, ap, move)["a"] == arr).all()


def test_an_empty_reservation_makes_no_file(paths):
    area_path, _ = paths
    assert stage.Area(area_path).reserve(0).nbytes == 0
    assert not os.path.exists(area_path)
