"""Readers of the QVIP paper's raw per-sample results (``../shared/anchors/qvip/QVIP22_Data/Experimental Results``).

Table 2 (``sec_5_2_Table_2.csv``): per dataset, groups ``(ID, result, smt-time, QVIP-time)`` for r = 1..4.
Table 3 (``sec_5_2_Table_3.csv``): blocks ``P<k>-<Q>:``, groups ``(ID, result, QVIP-time)`` for r = 2,4,6,10,20,30.
``result`` is ``Robust`` / ``Non-robust`` / ``NA`` (NA = 2 h timeout or a misclassified sample).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import QVIP, QVIP_NETS

RESULTS = QVIP / "QVIP22_Data" / "Experimental Results"


@dataclass(frozen=True)
class Published:
    id: int
    radius: int
    result: str                 # Robust | Non-robust | NA
    qvip_time: float | None
    smt_time: float | None = None


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [[c.strip() for c in row[1:]] for row in csv.reader(f)]


def table2(dataset: str = "MNIST") -> dict[tuple[int, int], Published]:
    """``{(id, r): Published}`` for the MNIST (P1-6) or Fashion-MNIST (P4-6) part of Table 2."""
    out: dict[tuple[int, int], Published] = {}
    current = None
    for row in _rows(RESULTS / "sec_5_2_Table_2.csv"):
        if row and row[0].endswith("Dataset:"):
            current = row[0].split()[0]
            continue
        if current != dataset.split()[0] or not row or not row[0].isdigit():
            continue
        for g, r in enumerate(range(1, 5)):
            cells = row[4 * g: 4 * g + 4]
            if len(cells) == 4 and cells[0].isdigit():
                out[(int(cells[0]), r)] = Published(int(cells[0]), r, cells[1], _num(cells[3]), _num(cells[2]))
    return out


TABLE3_RADII = (2, 4, 6, 10, 20, 30)


def table3() -> dict[str, dict[tuple[int, int], Published]]:
    """``{'P1-4': {(id, r): Published}, ...}``."""
    out: dict[str, dict[tuple[int, int], Published]] = {}
    block = None
    for row in _rows(RESULTS / "sec_5_2_Table_3.csv"):
        if row and row[0].startswith("P") and row[0].endswith(":"):
            block = row[0][:-1]
            out[block] = {}
            continue
        if block is None or not row or not row[0].isdigit():
            continue
        for g, r in enumerate(TABLE3_RADII):
            cells = row[3 * g: 3 * g + 3]
            if len(cells) == 3 and cells[0].isdigit():
                out[block][(int(cells[0]), r)] = Published(int(cells[0]), r, cells[1], _num(cells[2]))
    return out


def network_path(name: str) -> Path:
    """File of a paper network name such as ``P1-6`` or ``P3-10``."""
    k, q = name[1:].split("-")
    if name == "P1-6":
        return QVIP_NETS / "mnist_mlp.h5"
    arch = {"1": "1blk_64", "2": "1blk_100", "3": "2blk_64_32"}[k]
    return QVIP_NETS / "mnist" / f"qu_mnist_{arch}_in_8_qu_{q}.h5"
