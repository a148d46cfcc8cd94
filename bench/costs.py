"""What a run cost the machine: CPU seconds per process, Redis commands, PostgreSQL work.

Read before and after a measured run; the difference, divided by the pins or REST requests of
the run, is what the README's sizing guide multiplies out.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench.stack import Stack


def _group_cpu(pgid: int) -> float:
    """User + system CPU seconds of every live process in one process group."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    total = 0.0
    for pid in found.stdout.split():
        try:
            times = psutil.Process(int(pid)).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _named_cpu(name: str) -> float:
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if (proc.info.get("name") or "").startswith(name):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


@dataclass
class Costs:
    cpu: dict[str, float] = field(default_factory=dict)  # seconds by role
    redis_commands: int = 0
    pg: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, stack: Stack) -> Costs:
        import redis
        from django.db import connection

        roles = {"worker": ("worker", "clicks"), "web": ("web",), "sandbox": ("sandbox",)}
        cpu = {
            role: sum(_group_cpu(p.pid) for n, p in stack.procs.items() if n.startswith(names))
            for role, names in roles.items()
        }
        cpu["redis"] = _named_cpu("redis-server")
        # PostgreSQL's backends come and go (the load generator's connections): count the whole
        # machine's CPU, less the load generator (this process) and what is counted above.
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        me = psutil.Process().cpu_times()
        cpu["postgres"] = busy - (me.user + me.system) - sum(cpu.values())
        info: dict[str, Any] = redis.Redis.from_url(stack.env["REDIS_URL"]).info("stats")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT xact_commit, tup_returned, tup_fetched, tup_inserted + tup_updated "
                "+ tup_deleted FROM pg_stat_database WHERE datname = current_database()"
            )
            row = cursor.fetchone()
        connection.close()
        keys = ("transactions", "rows_scanned", "rows_fetched", "rows_written")
        return cls(cpu, int(info["total_commands_processed"]), dict(zip(keys, row, strict=True)))

    def since(self, before: Costs) -> Costs:
        """The run's share: every figure less the one read before it."""
        return Costs(
            {k: v - before.cpu.get(k, 0.0) for k, v in self.cpu.items()},
            self.redis_commands - before.redis_commands,
            {k: v - before.pg.get(k, 0) for k, v in self.pg.items()},
        )


def settle_stats() -> None:
    """PostgreSQL publishes a backend's counters to pg_stat_database only now and then (at the
    end of a transaction, at most once a second): wait for the last ones."""
    import time

    time.sleep(1.2)
