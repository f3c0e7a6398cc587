"""Run every golden case against memory ports and against pcap files."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden.harness import check_case, load_case

CASES = sorted(Path(__file__).parent.glob("*/*.yaml"))


@pytest.mark.parametrize("kind", ["memory", "pcap"])
@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path: Path, kind: str, tmp_path: Path) -> None:
    check_case(load_case(path), kind, tmp_path)


def test_cases_exist() -> None:
    assert len(CASES) >= 6
