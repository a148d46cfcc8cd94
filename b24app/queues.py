"""The Celery queues, by urgency: their names in one place.

No Django here: the settings route tasks onto these queues (CELERY_TASK_ROUTES), and the
commands that start workers (devtools.procs, for `make run`, the tests and the benchmarks) read
the same names without loading the settings.
"""

from __future__ import annotations

# A person's click waits on these: pin convergence and an add the web could not finish. The
# name is the one every task used before the split, so jobs queued before an upgrade still run.
CLICKS_QUEUE = "flowpins"
# Many toggles of one person — a Pin all / Unpin all, a read of their real pin states: a worker
# takes these only when no click waits, so a few people's bulk work never queues in front of
# everyone else's single clicks.
BULK_QUEUE = "flowpins.bulk"
# Reads that can come in storms (flow lists of many users, against slow portals) and the
# admin view's checks: someone may look at their result, but no click waits on them.
REFRESH_QUEUE = "flowpins.refresh"
# Sweeps and lifecycle work nobody watches: pruning, keeping tokens alive, (re)binding handlers.
HOUSEKEEPING_QUEUE = "flowpins.housekeeping"

# In order of urgency: a worker that takes several always takes from the first of them that has
# a job (settings: the broker's queue_order_strategy "priority"), so list them in this order.
FLOWPINS_QUEUES = (CLICKS_QUEUE, BULK_QUEUE, REFRESH_QUEUE, HOUSEKEEPING_QUEUE)
