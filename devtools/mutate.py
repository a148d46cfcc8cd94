"""`make mutate`: mutation testing (mutmut) of the verification module, the token/refresh service
and the convergence engine, against the tests marked `mutation` (see [tool.mutmut] in
pyproject.toml). Prints the score per module and in total, and every surviving mutant.

Each run starts afresh (mutmut keeps its results in mutants/ and would not re-check a mutant
after the tests changed) and removes mutants/ at the end unless MUTATE_KEEP=1 (then
`.venv/bin/mutmut show NAME` and `mutmut browse` work on the results). MUTATE_AGAIN=1 with a
kept mutants/ checks only the survivors of that run again, against the tests as they are now.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
MODULES = {
    "verification": ["b24app/frame.py", "b24app/eventauth.py"],
    "tokens": ["b24app/tokens.py", "b24app/latest.py"],
    "convergence": ["flows/converge.py", "flows/toggles.py", "flows/pending.py"],
}
# mutmut's exit codes: a failing test run kills the mutant; so does running out of time.
KILLED = {1, 3, 24, -24, 152, 255, 36}
SURVIVED = {0}


def _results(path: str) -> dict[str, int | None]:
    meta = json.loads((MUTANTS / f"{path}.meta").read_text())
    codes: dict[str, int | None] = meta["exit_code_by_key"]
    return codes


def _line(name: str, killed: int, total: int) -> str:
    share = 100.0 * killed / total if total else 0.0
    return f"{name:<28} {killed:>5} / {total:<5} killed  {share:5.1f} %"


def _survivors() -> list[str]:
    paths = [path for paths in MODULES.values() for path in paths]
    return sorted(k for path in paths for k, c in _results(path).items() if c in SURVIVED)


def main() -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    # One mutant at a time: the tests share one Redis database and one test database.
    command = [str(mutmut), "run", "--max-children", "1"]
    if os.environ.get("MUTATE_AGAIN") == "1" and MUTANTS.exists():
        command += _survivors()
    else:
        shutil.rmtree(MUTANTS, ignore_errors=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    minutes = (time.monotonic() - started) / 60
    if code != 0 or not MUTANTS.exists():
        print(f"mutmut run failed (exit {code})")
        return code or 1
    survivors: list[str] = []
    other: list[str] = []
    print()
    print(f"Mutation score (mutmut, {minutes:.1f} min)")
    all_killed = all_total = 0
    for module, paths in MODULES.items():
        killed = total = 0
        for path in paths:
            codes = _results(path)
            file_killed = sum(1 for c in codes.values() if c in KILLED)
            print("  " + _line(path, file_killed, len(codes)))
            killed += file_killed
            total += len(codes)
            survivors += sorted(k for k, c in codes.items() if c in SURVIVED)
            other += sorted(
                f"{k} (exit {c})" for k, c in codes.items() if c not in KILLED | SURVIVED
            )
        print(_line(module, killed, total))
        all_killed += killed
        all_total += total
    print(_line("total", all_killed, all_total))
    if other:
        print("\nNot killed and not survived (no covering test, or not run):")
        print("\n".join(f"  {name}" for name in other))
    if survivors:
        print(f"\n{len(survivors)} surviving mutants:")
        for name in survivors:
            shown = subprocess.run(
                [str(mutmut), "show", name], cwd=ROOT, capture_output=True, text=True
            ).stdout
            diff = [
                line
                for line in shown.splitlines()
                if line[:1] in "+-" and line[:3] not in ("+++", "---")
            ]
            print(f"  {name}")
            print("\n".join(f"      {line}" for line in diff))
    if os.environ.get("MUTATE_KEEP") != "1":
        shutil.rmtree(MUTANTS, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
