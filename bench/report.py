"""What every section shares: the run's size (BENCH_QUICK), its choice of sections (BENCH_ONLY),
percentiles and the report's tables."""

from __future__ import annotations

import math
import os

QUICK = os.environ.get("BENCH_QUICK") == "1"
# BENCH_ONLY=fairness,slow_portal runs only the sections whose function names contain one of
# these words (for working on one figure); unset runs everything.
ONLY = [w for w in os.environ.get("BENCH_ONLY", "").split(",") if w]


def wanted(name: str) -> bool:
    return not ONLY or any(word in name for word in ONLY)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class Report:
    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str], list[list[str]], str]] = []

    def add(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        self.sections.append((title, header, rows, note))
        print(self.render_one(title, header, rows, note), flush=True)

    @staticmethod
    def render_one(title: str, header: list[str], rows: list[list[str]], note: str) -> str:
        lines = [
            f"\n### {title}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if note:
            lines += ["", note]
        return "\n".join(lines)

    def markdown(self) -> str:
        return "\n".join(self.render_one(*s) for s in self.sections)
