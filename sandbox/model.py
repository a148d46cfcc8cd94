"""What a portal holds: departments, users, flows, tasks, bindings, tokens and counters.

Plain dataclasses; :class:`Portal` also carries the visibility rules (who sees which flow and
task). The mutable whole lives in :class:`sandbox.state.SandboxState`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .limits import LeakyBucket, OperatingMeter

APP_CODE = "sandbox.flowpins"
LOCAL_APP_ID = 7
APP_STATUS = "F"
PIN_LOG_SIZE = 500


def iso(ts: float) -> str:
    """Unix time -> ISO 8601 with offset (``2024-07-18T11:55:36+00:00``)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


@dataclass
class Department:
    id: int
    name: str
    parent: int = 0


@dataclass
class User:
    id: int
    name: str
    last_name: str
    admin: bool = False
    departments: list[int] = field(default_factory=list)
    extranet: bool = False
    gender: str = ""
    email: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.name} {self.last_name}".strip()


@dataclass
class Flow:
    id: int
    name: str
    description: str
    active: bool
    efficiency: int
    group_id: int
    owner_id: int
    creator_id: int
    distribution_type: str  # manually | queue | himself
    planned_completion_time: int  # seconds
    activity: str  # ISO date of last activity
    demo: bool
    access: list[str]  # access codes: UA, U<id>, D<dept>, DR<dept>
    responsible: list[int]
    template_id: int = 0


@dataclass
class Task:
    id: int
    title: str
    description: str
    flow_id: int  # 0 = not in a flow
    created_by: int
    responsible_id: int
    group_id: int
    status: int
    priority: int
    created_date: str
    changed_date: str
    deadline: str | None = None
    accomplices: list[int] = field(default_factory=list)
    auditors: list[int] = field(default_factory=list)


@dataclass
class PlacementBinding:
    id: int
    placement: str
    handler: str
    title: str
    description: str
    user_id: int
    options: dict[str, Any]
    lang_all: dict[str, dict[str, str]]


@dataclass
class EventBinding:
    id: int
    event: str
    handler: str  # "" for offline bindings
    user_id: int  # auth_type: 0 = the user who caused the event
    offline: bool = False


@dataclass
class TokenPair:
    """One access/refresh pair, as issued by the OAuth server."""

    access_token: str
    refresh_token: str
    member_id: str
    user_id: int
    client_id: str
    scope: str
    issued_at: float
    access_expires_at: float
    refresh_expires_at: float
    access_killed: bool = False  # rotated away or force-expired: answers expired_token
    refresh_used: bool = False


@dataclass
class Counters:
    requests: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    http_status: dict[str, int] = field(default_factory=dict)
    http_503: int = 0
    http_429: int = 0
    faults_5xx: int = 0
    dropped_responses: int = 0
    pin_toggles: int = 0
    refresh_ok: int = 0
    refresh_failed: int = 0
    refresh_dropped: int = 0
    tokens_issued: int = 0
    events_sent: int = 0
    events_forged: int = 0

    def bump(self, table: dict[str, int], key: str, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Portal:
    seed_name: str
    name: str
    member_id: str
    language: str
    departments: dict[int, Department]
    users: dict[int, User]
    flows: dict[int, Flow]
    tasks: dict[int, Task]
    pins: dict[int, set[int]] = field(default_factory=dict)
    installed: bool = False
    application_token: str = ""
    app_version: int = 1
    placements: list[PlacementBinding] = field(default_factory=list)
    events: list[EventBinding] = field(default_factory=list)
    next_binding_id: int = 1
    implicit_handler_ids: dict[str, int] = field(default_factory=dict)
    bucket: LeakyBucket = field(default_factory=LeakyBucket)
    operating: OperatingMeter = field(default_factory=OperatingMeter)
    counters: Counters = field(default_factory=Counters)
    pin_log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=PIN_LOG_SIZE))
    host: str = ""  # the loopback address the portal is served on (see SandboxState.origin)
    old_hosts: list[str] = field(default_factory=list)  # before renames: answer 302
    old_names: list[str] = field(default_factory=list)

    @property
    def domain(self) -> str:
        """The display domain (``DOMAIN`` itself is :meth:`SandboxState.domain`)."""
        return f"{self.name}.sandbox.localhost"

    def new_binding_id(self) -> int:
        value = self.next_binding_id
        self.next_binding_id += 1
        return value

    def next_flow_id(self) -> int:
        return max(self.flows, default=100) + 1

    def next_task_id(self) -> int:
        return max(self.tasks, default=1000) + 1

    # -- visibility rules (FlowReadRule / task access, simplified) -----------------------------

    def access_codes(self, user: User) -> set[str]:
        codes = {f"U{user.id}"}
        if not user.extranet:
            codes.add("UA")
        for dept in user.departments:
            codes.add(f"D{dept}")
            current = dept
            seen: set[int] = set()
            while current and current not in seen:
                seen.add(current)
                codes.add(f"DR{current}")
                parent = self.departments.get(current)
                current = parent.parent if parent else 0
        return codes

    def can_see_flow(self, user: User, flow: Flow) -> bool:
        if user.admin:
            return True
        return bool(self.access_codes(user).intersection(flow.access))

    def visible_flows(self, user: User) -> list[Flow]:
        ordered = sorted(self.flows.values(), key=lambda f: f.id)
        if user.admin:
            return ordered
        codes = self.access_codes(user)
        return [f for f in ordered if codes.intersection(f.access)]

    def can_see_task(self, user: User, task: Task) -> bool:
        if user.admin:
            return True
        return user.id in (task.created_by, task.responsible_id) or (
            user.id in task.accomplices or user.id in task.auditors
        )

    def flow_visible_to(self, flow: Flow) -> list[int]:
        return sorted(u.id for u in self.users.values() if self.can_see_flow(u, flow))

    def pinned(self, user_id: int) -> list[int]:
        return sorted(self.pins.get(user_id, set()))
