"""Names of the data plane's reasons, read from bpf/drop_reasons.h (the header the C uses).

Each reason is one line ``#define XT_R_<NAME> <number> // <verdict>: <meaning>``; the names are
never retyped here, so C and Python cannot drift apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "drop_reasons.h"
_LINE = re.compile(r"^#define\s+XT_R_([A-Z0-9_]+)\s+(\d+)\s*//\s*(\w+):\s*(.+?)\s*$")
_MAX = re.compile(r"^#define\s+XT_R_MAX\s+(\d+)")


@dataclass(frozen=True)
class Reason:
    number: int
    name: str        # lower case, e.g. "unknown_tunnel"
    verdict: str     # "pass", "drop", "tx", "redirect"
    meaning: str


@dataclass(frozen=True)
class Reasons:
    by_number: dict[int, Reason]
    max: int         # XT_R_MAX: the size of the per-reason counter array

    def name(self, number: int) -> str:
        r = self.by_number.get(number)
        return r.name if r else f"reason_{number}"

    def number(self, name: str) -> int:
        for r in self.by_number.values():
            if r.name == name:
                return r.number
        raise KeyError(name)


def parse(text: str) -> Reasons:
    by_number: dict[int, Reason] = {}
    top = None
    for line in text.splitlines():
        m = _MAX.match(line)
        if m:
            top = int(m.group(1))
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, number = m.group(1).lower(), int(m.group(2))
        if number in by_number:
            raise ValueError(f"reason number {number} used by both {by_number[number].name} "
                             f"and {name}")
        by_number[number] = Reason(number, name, m.group(3), m.group(4))
    if top is None:
        raise ValueError("no XT_R_MAX in the reasons header")
    if by_number and max(by_number) >= top:
        raise ValueError(f"XT_R_MAX ({top}) must be above every reason number")
    return Reasons(by_number, top)


@cache
def load(path: Path = HEADER) -> Reasons:
    return parse(path.read_text())
