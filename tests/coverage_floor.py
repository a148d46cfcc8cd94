"""Branch coverage of the modules that guard trust, tokens and pins, with a floor `make test` keeps.

Active only when pytest-cov measures (`make test` passes `--cov`). After pytest-cov has
combined the data of the test process and of every process it started (the Celery worker runs
the pin engine), this prints one line per guarded group and for b24app/ and flows/ as a whole,
and fails the run when a group's branch coverage falls under its floor.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Floors are set a little under the figures measured when they were introduced (README,
# "Tests"): a change that drops a group's tested branches fails the run; raise them as tests grow.
GROUPS: dict[str, tuple[float, tuple[str, ...]]] = {
    "verification": (
        90.0,
        ("b24app/frame.py", "b24app/eventauth.py", "b24app/bitrix/oauth.py", "flows/apiauth.py"),
    ),
    "tokens": (94.0, ("b24app/tokens.py",)),
    "convergence": (
        92.0,
        ("flows/converge.py", "flows/toggles.py", "flows/lock.py", "flows/intents.py"),
    ),
}
PACKAGES = ("b24app/", "flows/")


@dataclass
class Figure:
    lines: int = 0
    lines_hit: int = 0
    branches: int = 0
    branches_hit: int = 0

    def add(self, summary: dict[str, Any]) -> None:
        self.lines += summary["num_statements"]
        self.lines_hit += summary["covered_lines"]
        self.branches += summary["num_branches"]
        self.branches_hit += summary["covered_branches"]

    @property
    def branch_pct(self) -> float:
        return 100.0 * self.branches_hit / self.branches if self.branches else 100.0

    @property
    def line_pct(self) -> float:
        return 100.0 * self.lines_hit / self.lines if self.lines else 100.0

    def text(self) -> str:
        return (
            f"branches {self.branches_hit}/{self.branches} = {self.branch_pct:5.1f}%, "
            f"lines {self.lines_hit}/{self.lines} = {self.line_pct:5.1f}%"
        )


def _summaries(cov: Any) -> dict[str, dict[str, Any]]:
    """Per-file summaries from coverage's JSON report, keyed by the path below the project."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        files = json.loads(out.read_text())["files"]
    summaries = {}
    for name, data in files.items():
        path = Path(name)
        rel = path.resolve().relative_to(root) if path.is_absolute() else path
        summaries[rel.as_posix()] = data["summary"]
    return summaries


def measure(cov: Any) -> tuple[list[tuple[str, Figure, float | None]], list[str]]:
    """(label, figure, floor) rows for the groups and packages, and the groups under floor."""
    summaries = _summaries(cov)
    rows: list[tuple[str, Figure, float | None]] = []
    under = []
    for group, (floor, files) in GROUPS.items():
        figure = Figure()
        for name in files:
            figure.add(summaries[name])  # a guarded module that was never imported is an error
        rows.append((group, figure, floor))
        if figure.branch_pct < floor:
            under.append(f"{group} {figure.branch_pct:.1f}% < {floor:.0f}%")
    for package in PACKAGES:
        figure = Figure()
        for name, summary in summaries.items():
            if name.startswith(package):
                figure.add(summary)
        rows.append((package, figure, None))
    return rows, under


class CoverageFloor:
    def __init__(self) -> None:
        self.rows: list[tuple[str, Figure, float | None]] = []
        self.under: list[str] = []

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Any:
        # Outermost wrapper: pytest-cov (inside) has combined every process's data by now.
        result = yield
        plugin = session.config.pluginmanager.getplugin("_cov")
        controller = getattr(plugin, "cov_controller", None)
        if controller is None or session.config.option.collectonly:
            return result
        self.rows, self.under = measure(controller.cov)
        if self.under:
            session.testsfailed += 1  # the exit code of a failed run
        return result

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.rows:
            return
        terminalreporter.write_sep("=", "branch coverage")
        for label, figure, floor in self.rows:
            bound = f"  (floor {floor:.0f}%)" if floor is not None else ""
            terminalreporter.write_line(f"{label:<13} {figure.text()}{bound}")
        if self.under:
            terminalreporter.write_line(
                "FAIL coverage under its floor: " + "; ".join(self.under), red=True, bold=True
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(CoverageFloor(), "flowpins-coverage-floor")
