"""`make run` keeps its data in SQLite unless DATABASE_URL says otherwise, while CI runs on
PostgreSQL: run a few convergence rules on SQLite too. The hot path writes and reads some rows
with hand-written SQL (b24app.rawsql), and SQLite's driver hands datetimes and booleans back
differently from PostgreSQL's — an install there once failed comparing a naive expiry with an
aware clock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RULES = [
    "tests/flows/test_converge_rules.py::test_a_run_pins_what_the_user_wants_and_closes_the_intents",
    "tests/flows/test_converge_rules.py::test_a_lost_answer_leaves_the_state_unknown_and_the_flow_alone",
    "tests/flows/test_converge_rules.py::test_a_flow_waiting_out_a_lost_answer_does_not_hold_up_the_others",
    "tests/b24app/test_token_rules.py::test_storing_a_new_user_keeps_both_tokens_and_the_expiry",
]


def test_the_convergence_rules_hold_on_sqlite_too(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "COVERAGE_PROCESS_START")
    }
    env["FLOWPINS_VAR_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--no-cov", *RULES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(RULES)} passed" in done.stdout, done.stdout[-2000:]
