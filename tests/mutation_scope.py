"""A pytest plugin for `make mutate` (loaded by [tool.mutmut]'s pytest arguments): a mutant is
tested by the rule tests of its own module only.

mutmut runs every test that reached the mutated function, and every test here installs the
app through the frame POST, so without this a mutant of the verification module would run the
token and convergence tests too: slower, and a kill there would not say that the module's own
tests guard it. Outside a mutant's run (the stats and clean runs, `make test`) nothing changes.
"""

from __future__ import annotations

import os

import pytest

OWN_TESTS = {
    "b24app.frame": "test_verification_rules.py",
    "b24app.eventauth": "test_verification_rules.py",
    "b24app.tokens": "test_token_rules.py",
    "b24app.latest": "test_token_rules.py",
    "flows.converge": "test_converge_rules.py",
    "flows.toggles": "test_converge_rules.py",
    "flows.pending": "test_converge_rules.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    own = OWN_TESTS.get(mutant.rpartition(".")[0])
    if own is None:
        return
    keep = [item for item in items if item.path.name == own]
    dropped = [item for item in items if item.path.name != own]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
