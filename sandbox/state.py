"""The sandbox's data model: portals, users, flows, tasks, installed-app state, tokens, knobs.

Everything lives in one :class:`SandboxState` guarded by a single re-entrant lock
(``state.lock``). Request handlers take the lock for the short in-memory work and release it
before sleeping (latency knob) or talking to the network (event delivery).

Seed data is deterministic: the same portal names always get the same member_ids, users,
flows and tasks, so tests can hard-code ids.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from .limits import LeakyBucket, OperatingMeter

DEFAULT_CLIENT_ID = "local.sandbox0000000001"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"  # noqa: S105 - a well-known test value
DEFAULT_APP_URL = "http://127.0.0.1:8000"
DEFAULT_SCOPE = "task,placement"
APP_CODE = "sandbox.flowpins"
LOCAL_APP_ID = 7
APP_STATUS = "F"
SEED_PORTALS = ("alpha", "beta")
PIN_LOG_SIZE = 500
SEED_HOST_BLOCK = 0  # seed portals live on 127.0.x.y
RENAME_HOST_BLOCK = 1  # renamed portals move to 127.1.x.y
_HOSTS_PER_OCTET = 253  # .2 .. .254 of every /24


def iso(ts: float) -> str:
    """Unix time -> ISO 8601 with offset (``2024-07-18T11:55:36+00:00``)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# knobs


@dataclass(frozen=True)
class Knobs:
    """Fault and limit knobs. Global values, optionally overridden per portal.

    ``seed`` is global only (it seeds the one random generator used for all ratios).
    """

    latency_ms: float = 0.0
    pin_drop_ratio: float = 0.0
    refresh_drop_ratio: float = 0.0
    error_5xx_ratio: float = 0.0
    rate: float = 2.0
    burst: float = 50.0
    token_ttl: float = 3600.0
    refresh_ttl: float = 180 * 86400.0
    flow_list_enabled: bool = True
    operating_cost: float = 0.0
    operating_limit: float = 420.0
    operating_bucket_seconds: float = 60.0
    payment_expired: bool = False
    portal_deleted: bool = False
    pin_error_status: int = 400
    scope: str = DEFAULT_SCOPE
    handler_url_check: bool = True
    malformed_answers: bool = False
    seed: int = 0


KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Knobs))
GLOBAL_ONLY_KNOBS = frozenset({"seed"})
_KNOB_TYPES: dict[str, type] = {name: type(getattr(Knobs(), name)) for name in KNOB_NAMES}
_RATIO_KNOBS = frozenset({"pin_drop_ratio", "refresh_drop_ratio", "error_5xx_ratio"})
_POSITIVE_KNOBS = frozenset(
    {"rate", "burst", "token_ttl", "refresh_ttl", "operating_bucket_seconds"}
)


class KnobError(ValueError):
    """Unknown knob or a value of the wrong type/range."""


def coerce_knob(name: str, value: Any) -> Any:
    """Validate and convert a knob value (JSON or CLI input) to the knob's type."""
    if name not in _KNOB_TYPES:
        raise KnobError(f"unknown knob {name!r}; known: {', '.join(KNOB_NAMES)}")
    kind = _KNOB_TYPES[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "y", "n", "on", "off"):
                    raise ValueError(value)
                result: Any = lowered in ("1", "true", "yes", "y", "on")
            else:
                result = bool(value)
        elif kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            result = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
        else:
            result = str(value)
    except (TypeError, ValueError) as exc:
        raise KnobError(f"knob {name!r}: bad value {value!r}") from exc
    if name in _RATIO_KNOBS and not 0.0 <= result <= 1.0:
        raise KnobError(f"knob {name!r} must be within 0..1")
    if name in _POSITIVE_KNOBS and result <= 0:
        raise KnobError(f"knob {name!r} must be > 0")
    if name in ("latency_ms", "operating_cost", "operating_limit") and result < 0:
        raise KnobError(f"knob {name!r} must be >= 0")
    if name == "pin_error_status" and not 200 <= result <= 599:
        raise KnobError("knob 'pin_error_status' must be an HTTP status (200..599)")
    return result


# --------------------------------------------------------------------------------------------
# portal content


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


# --------------------------------------------------------------------------------------------
# seed data

_SEED_TIME = datetime(2025, 9, 1, 9, 0, tzinfo=UTC).timestamp()

_DEPARTMENTS = [
    Department(1, "Компания"),
    Department(10, "Отдел продаж", 1),
    Department(20, "Служба поддержки", 1),
    Department(21, "Поддержка, 2-я линия", 20),
]

_ALPHA_USERS = [
    User(1, "Анна", "Админова", admin=True, departments=[1], gender="F"),
    User(2, "Борис", "Продажин", departments=[10], gender="M"),
    User(3, "Carol", "Support", departments=[20], gender="F"),
    User(4, "Дмитрий", "Внешний", extranet=True, gender="M"),
    User(5, "Елена", "Маркетова", departments=[21], gender="F"),
    User(6, "Frank", "Field", departments=[], gender="M"),
]

_BETA_USERS = [
    User(1, "Анна", "Админова", admin=True, departments=[1], gender="F"),
    User(2, "Пётр", "Иванов", departments=[10], gender="M"),
    User(3, "Jane", "Doe", departments=[20], gender="F"),
    User(4, "Гость", "Подрядчик", extranet=True, gender="M"),
    User(5, "Ольга", "Смирнова", departments=[21], gender="F"),
    User(6, "Mark", "Twain", departments=[], gender="M"),
]

# id, name, access codes, active, efficiency, group, owner, creator, distribution, demo
_FlowSpec = tuple[int, str, list[str], bool, int, int, int, int, str, bool]

_ALPHA_FLOWS: list[_FlowSpec] = [
    (101, "Поток продаж", ["UA"], True, 87, 5, 1, 1, "manually", False),
    (102, "Поддержка клиентов", ["D20", "U4"], True, 64, 6, 3, 1, "queue", False),
    (103, "<b>Bold</b> & \"quotes\" 'x'", ["U2", "U3"], True, 50, 0, 2, 2, "himself", False),
    (104, "<script>alert(1)</script>", ["UA"], True, 12, 0, 1, 1, "manually", False),
    (105, "Маркетинговые кампании", ["D10"], False, 0, 7, 2, 1, "queue", False),
    (106, "Разработка", ["U3"], True, 91, 8, 3, 3, "himself", False),
    (107, "Бухгалтерия / Accounting", ["U2"], True, 70, 0, 1, 1, "manually", False),
    (108, "Онбординг сотрудников", ["UA"], False, 100, 0, 1, 1, "queue", True),
    (109, "Логистика", ["U4", "U1"], True, 45, 9, 1, 1, "manually", False),
    (110, "Юридический отдел", ["DR20"], True, 33, 0, 1, 1, "queue", False),
]

_BETA_FLOWS: list[_FlowSpec] = [
    (101, "Поток закупок", ["UA"], True, 76, 3, 1, 1, "queue", False),
    (102, 'Сервис <i>24/7</i> & "ночная" смена', ["D20"], True, 58, 0, 3, 1, "queue", False),
    (103, "Найм", ["U2"], True, 81, 0, 2, 1, "manually", False),
    (104, "QA & тестирование", ["U3", "U2"], True, 40, 4, 3, 3, "himself", False),
    (105, "Архив 2024", ["UA"], False, 0, 0, 1, 1, "manually", False),
    (106, "Склад", ["U4"], True, 66, 0, 1, 1, "queue", False),
    (107, 'Проект "Альфа"', ["D10"], True, 93, 2, 2, 2, "manually", False),
    (108, "Финансы", ["U1"], True, 55, 0, 1, 1, "manually", False),
    (109, "Партнёры", ["U3"], True, 20, 0, 3, 1, "himself", False),
]

_TASK_TITLES = [
    "Позвонить клиенту",
    "Подготовить коммерческое предложение",
    "Проверить договор",
    "Ответить на обращение",
    "Обновить прайс-лист",
    "Согласовать счёт",
    "Review the release notes",
    "Отправить образцы",
    "Провести созвон",
    "Заполнить отчёт",
]

# (flow, created_by, responsible) - flow 107 deliberately has no task visible to user 2,
# who can see the flow itself.
_ALPHA_TASKS: list[tuple[int, int, int]] = [
    (101, 1, 2), (101, 2, 2), (101, 2, 3), (101, 3, 2), (101, 1, 1), (101, 2, 1),
    (102, 3, 3), (102, 1, 4), (102, 4, 4), (102, 3, 1),
    (103, 2, 3), (103, 3, 2), (103, 2, 2),
    (104, 1, 2), (104, 1, 3),
    (105, 2, 2), (105, 1, 1),
    (106, 3, 3), (106, 1, 3),
    (107, 1, 1), (107, 1, 1),
    (108, 1, 2),
    (109, 1, 4), (109, 4, 1),
    (110, 3, 3), (110, 1, 1),
    (0, 2, 2), (0, 3, 3), (0, 1, 2), (0, 4, 4), (0, 1, 1), (0, 2, 3), (0, 3, 1), (0, 1, 4),
]  # fmt: skip

_BETA_TASKS: list[tuple[int, int, int]] = [
    (101, 1, 2), (101, 2, 3), (101, 3, 3), (101, 1, 1),
    (102, 3, 3), (102, 1, 3),
    (103, 2, 2), (103, 1, 2),
    (104, 3, 2), (104, 2, 3),
    (106, 4, 4), (106, 1, 4),
    (107, 2, 2),
    (108, 1, 1),
    (0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 4), (0, 2, 1), (0, 3, 2),
]  # fmt: skip

_GEN_FIRST = ["Алексей", "Мария", "Иван", "Ольга", "Sam", "Elena", "Кирилл", "Nina"]
_GEN_LAST = ["Смирнов", "Кузнецова", "Попов", "Lee", "Новикова", "Морозов", "Garcia", "Волкова"]
_GEN_FLOW_WORDS = ["Продажи", "Поддержка", "Закупки", "HR", "Маркетинг", "Склад", "Финансы", "IT"]
_GEN_ACCESS = [
    ["UA"],
    ["U2"],
    ["U3"],
    ["D10"],
    ["D20", "U4"],
    ["DR20"],
    ["U2", "U3"],
    ["U4"],
    ["UA"],
]


def member_id_for(seed_name: str) -> str:
    """32 hex chars, stable for a seed name (survives renames)."""
    return hashlib.md5(seed_name.encode("utf-8")).hexdigest()  # noqa: S324 - not security


def _make_flow(spec: _FlowSpec, index: int) -> Flow:
    fid, name, access, active, eff, group, owner, creator, dist, demo = spec
    responsible = sorted({int(c[1:]) for c in access if c.startswith("U") and c[1:].isdigit()}) or [
        owner
    ]
    return Flow(
        id=fid,
        name=name,
        description=f"Описание потока «{name}»",
        active=active,
        efficiency=eff,
        group_id=group,
        owner_id=owner,
        creator_id=creator,
        distribution_type=dist,
        planned_completion_time=[86400, 7200, 172800, 3600][index % 4],
        activity=iso(_SEED_TIME + index * 3600),
        demo=demo,
        access=list(access),
        responsible=responsible,
    )


def _make_tasks(specs: Iterable[tuple[int, int, int]], first_id: int = 1001) -> dict[int, Task]:
    tasks: dict[int, Task] = {}
    for offset, (flow_id, creator, responsible) in enumerate(specs):
        tid = first_id + offset
        title = f"{_TASK_TITLES[offset % len(_TASK_TITLES)]} №{tid}"
        created = _SEED_TIME + offset * 5400
        tasks[tid] = Task(
            id=tid,
            title=title,
            description=f"Описание задачи {tid}",
            flow_id=flow_id,
            created_by=creator,
            responsible_id=responsible,
            group_id=0,
            status=[2, 3, 2, 5, 2][offset % 5],
            priority=[1, 2, 1][offset % 3],
            created_date=iso(created),
            changed_date=iso(created + 7200),
            deadline=iso(created + 86400 * 3) if offset % 3 == 0 else None,
        )
    return tasks


def _copy_users(users: list[User]) -> dict[int, User]:
    return {u.id: replace(u, departments=list(u.departments)) for u in users}


def _departments() -> dict[int, Department]:
    return {d.id: replace(d) for d in _DEPARTMENTS}


def seed_portal(seed_name: str) -> Portal:
    """Build the deterministic seed portal for ``seed_name``."""
    if seed_name == "alpha":
        users = _copy_users(_ALPHA_USERS)
        flows = {s[0]: _make_flow(s, i) for i, s in enumerate(_ALPHA_FLOWS)}
        tasks = _make_tasks(_ALPHA_TASKS)
        language = "ru"
    elif seed_name == "beta":
        users = _copy_users(_BETA_USERS)
        flows = {s[0]: _make_flow(s, i) for i, s in enumerate(_BETA_FLOWS)}
        tasks = _make_tasks(_BETA_TASKS)
        language = "en"
    else:
        rng = random.Random(seed_name)  # noqa: S311 - deterministic test data
        users = {1: replace(_ALPHA_USERS[0], departments=[1])}
        for uid, dept, extranet in (
            (2, [10], False),
            (3, [20], False),
            (4, [], True),
            (5, [20], False),
            (6, [], False),
        ):
            users[uid] = User(
                uid,
                rng.choice(_GEN_FIRST),
                rng.choice(_GEN_LAST),
                departments=list(dept),
                extranet=extranet,
            )
        flows = {}
        for i in range(10):
            fid = 101 + i
            spec: _FlowSpec = (
                fid,
                f"{rng.choice(_GEN_FLOW_WORDS)} — поток {fid}",
                list(_GEN_ACCESS[i % len(_GEN_ACCESS)]),
                i % 5 != 4,
                rng.randint(0, 100),
                0,
                1,
                1,
                rng.choice(["manually", "queue", "himself"]),
                False,
            )
            flows[fid] = _make_flow(spec, i)
        task_specs = [
            (rng.choice([0, *flows]), rng.randint(1, 4), rng.randint(1, 4)) for _ in range(30)
        ]
        tasks = _make_tasks(task_specs)
        language = "en"
    return Portal(
        seed_name=seed_name,
        name=seed_name,
        member_id=member_id_for(seed_name),
        language=language,
        departments=_departments(),
        users=users,
        flows=flows,
        tasks=tasks,
    )


def seed_names(count: int) -> list[str]:
    names = list(SEED_PORTALS[: max(count, 0)])
    names.extend(f"p{i}" for i in range(3, count + 1))
    return names


def loopback_host(block: int, index: int) -> str:
    """The ``index``-th portal address of a block: ``127.<block>.<index // 253>.<2 + index % 253>``.

    Block 0 holds the seed portals in seed order (alpha 127.0.0.2, beta 127.0.0.3, ...), block 1
    the hosts renames move portals to (127.1.0.2, 127.1.0.3, ...). Linux routes all of
    127.0.0.0/8 to the loopback interface, so these bind without any setup.
    """
    third, fourth = divmod(index, _HOSTS_PER_OCTET)
    if index < 0 or third > 255:
        raise ValueError(f"no loopback address #{index} in block {block}")
    return f"127.{block}.{third}.{2 + fourth}"


def _old_address(portal: Portal, host: str | None, name: str) -> bool:
    """Is (host, name) a past address of ``portal`` (old host and/or old name)?"""
    hosts_match = host is None or host == portal.host or host in portal.old_hosts
    names_match = name == portal.name or name in portal.old_names
    return hosts_match and names_match and (host, name) != (portal.host, portal.name)


def seed_hosts(count: int) -> list[str]:
    """The hosts of the seed portals of ``SandboxState(portals=count)``, in seed order."""
    return [loopback_host(SEED_HOST_BLOCK, i) for i in range(len(seed_names(count)))]


# --------------------------------------------------------------------------------------------
# the state


class SandboxState:
    """All mutable sandbox data. Take ``lock`` around any read-modify-write.

    With ``distinct_hosts`` every portal has its own loopback host (``portal.host``) on
    ``portal_port``: its origin is ``http://<host>:<portal_port>`` and requests for its pages or
    REST must arrive on that host (:meth:`locate`). ``bind_host`` is called for a host a rename
    moves a portal to (the server binds a listener there; it may raise :class:`OSError`).
    Without it, every portal shares ``base_url`` as before.
    """

    def __init__(
        self,
        *,
        base_url: str,
        app_url: str = DEFAULT_APP_URL,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        portals: int = 2,
        knobs: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        distinct_hosts: bool = False,
        portal_port: int | None = None,
        base_host: str | None = None,
        bind_host: Callable[[str], None] | None = None,
    ) -> None:
        if portals < 1:
            raise ValueError("portals must be >= 1")
        self.lock = threading.RLock()
        self.base_url = base_url.rstrip("/")
        self.app_url = app_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.portal_count = portals
        self.clock = clock
        base = urlsplit(self.base_url)
        self.distinct_hosts = distinct_hosts
        self.base_host = base_host or base.hostname or "127.0.0.1"
        self.portal_port = portal_port or base.port or (443 if base.scheme == "https" else 80)
        self.bind_host: Callable[[str], None] = bind_host or (lambda host: None)
        self.renames = 0  # rename hosts handed out since the last reset
        self._initial_knobs = Knobs(**{k: coerce_knob(k, v) for k, v in (knobs or {}).items()})
        self.knobs = self._initial_knobs
        self.portal_knobs: dict[str, dict[str, Any]] = {}  # by member_id
        self.portals: dict[str, Portal] = {}
        self.aliases: dict[str, str] = {}
        self.access_tokens: dict[str, TokenPair] = {}
        self.refresh_tokens: dict[str, TokenPair] = {}
        self.oauth_unknown_failures = 0
        self.rng = random.Random(self.knobs.seed)  # noqa: S311 - reproducible fault injection
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------------

    def reset(self, keep_knobs: bool = False) -> None:
        """Back to the seed: same names, member_ids and hosts, no tokens, counters zero."""
        with self.lock:
            if not keep_knobs:
                self.knobs = self._initial_knobs
                self.portal_knobs = {}
            names = seed_names(self.portal_count)
            hosts = seed_hosts(self.portal_count) if self.distinct_hosts else []
            self.portals = {name: seed_portal(name) for name in names}
            for index, portal in enumerate(self.portals.values()):
                portal.host = hosts[index] if hosts else self.base_host
            self.aliases = {}
            self.renames = 0
            self.access_tokens = {}
            self.refresh_tokens = {}
            self.oauth_unknown_failures = 0
            self.rng = random.Random(self.knobs.seed)  # noqa: S311

    # -- addresses -----------------------------------------------------------------------------

    @property
    def server_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    @property
    def oauth_domain(self) -> str:
        return urlsplit(self.base_url).netloc

    def origin(self, portal: Portal) -> str:
        """``scheme://host:port`` the portal is served on (``base_url`` without distinct hosts)."""
        if not self.distinct_hosts:
            return self.base_url
        return f"http://{portal.host}:{self.portal_port}"

    def domain(self, portal: Portal) -> str:
        """``DOMAIN`` / ``auth[domain]`` / ``install.domain``.

        With distinct hosts it is the portal's ``host:port``, so ``PROTOCOL://DOMAIN`` is the
        portal's origin, as on Bitrix24 (BX24.js posts to the parent frame at that origin).
        Without, the display domain ``NAME.sandbox.localhost``.
        """
        if not self.distinct_hosts:
            return portal.domain
        return urlsplit(self.origin(portal)).netloc

    def protocol(self, portal: Portal) -> str:
        """The launch query's ``PROTOCOL``: 1 for https."""
        return "1" if self.origin(portal).startswith("https:") else "0"

    def portal_uri(self, portal: Portal) -> str:
        """app.info's ``install.uri``."""
        return self.origin(portal) if self.distinct_hosts else f"http://{portal.domain}"

    def client_endpoint(self, portal: Portal) -> str:
        return f"{self.origin(portal)}/p/{portal.name}/rest/"

    def page_url(self, portal: Portal) -> str:
        return f"{self.origin(portal)}/p/{portal.name}/"

    def location(self, portal: Portal, rest: str, query: str = "") -> str:
        """``{origin}/p/NAME/{rest}[?query]``: where a moved address redirects to."""
        return f"{self.origin(portal)}/p/{portal.name}/{rest}" + (f"?{query}" if query else "")

    def serves_base(self, host: str) -> bool:
        """Whether a request that arrived on ``host`` may reach the OAuth server and index."""
        return not self.distinct_hosts or host == self.base_host

    def portal_on_host(self, host: str) -> Portal | None:
        if not self.distinct_hosts:
            return None
        return next((p for p in self.portals.values() if p.host == host), None)

    # -- lookup --------------------------------------------------------------------------------

    def locate(self, host: str, name: str) -> tuple[str, Portal | None]:
        """Route ``/p/NAME/...`` that arrived on local address ``host``.

        Returns ``("ok", portal)``; ``("moved", portal)`` for an old host and/or old name of a
        renamed portal (answer 302 to :meth:`location`); ``("wrong_host", portal_or_None)`` when
        the name is known but this host is not (one of) the portal's; ``("missing", None)``.
        Without distinct hosts the host is ignored (renames are by name only).
        """
        checked = host if self.distinct_hosts else None
        portal = self.portals.get(name)
        if portal is not None and checked in (None, portal.host):
            return "ok", portal
        for candidate in (self.portal_by_name_or_alias(name), self._old_host_owner(checked)):
            if candidate is not None and _old_address(candidate, checked, name):
                return "moved", candidate
        if portal is not None or name in self.aliases:
            return "wrong_host", portal or self.portal_by_name_or_alias(name)
        return "missing", None

    def _old_host_owner(self, host: str | None) -> Portal | None:
        if host is None:
            return None
        return next((p for p in self.portals.values() if host in p.old_hosts), None)

    def resolve(self, name: str) -> tuple[Portal | None, str | None]:
        """Find a portal by current name; for an old (renamed) name return the new name."""
        portal = self.portals.get(name)
        if portal is not None:
            return portal, None
        new_name = self.aliases.get(name)
        if new_name is not None and new_name in self.portals:
            return None, new_name
        return None, None

    def portal_by_name_or_alias(self, name: str) -> Portal | None:
        portal, new_name = self.resolve(name)
        if portal is None and new_name is not None:
            portal = self.portals[new_name]
        return portal

    def portal_by_member(self, member_id: str) -> Portal | None:
        for portal in self.portals.values():
            if portal.member_id == member_id:
                return portal
        return None

    def rename(self, portal: Portal, new_name: str) -> None:
        """Rename; with distinct hosts the portal also moves to a new host (may raise OSError)."""
        new_host = self._allocate_rename_host() if self.distinct_hosts else portal.host
        old = portal.name
        del self.portals[old]
        self.aliases.pop(new_name, None)
        for alias, target in list(self.aliases.items()):
            if target == old:
                self.aliases[alias] = new_name
        self.aliases[old] = new_name
        portal.old_names.append(old)
        if new_host != portal.host:
            portal.old_hosts.append(portal.host)
            portal.host = new_host
        portal.name = new_name
        self.portals[new_name] = portal

    def _allocate_rename_host(self) -> str:
        """The next free host of the rename block, with a listener bound (skips busy ones)."""
        failure: OSError | None = None
        for _ in range(16):
            host = loopback_host(RENAME_HOST_BLOCK, self.renames)
            self.renames += 1
            try:
                self.bind_host(host)
            except OSError as exc:
                failure = exc
                continue
            return host
        raise OSError(f"no rename host could be bound: {failure}")

    # -- knobs ---------------------------------------------------------------------------------

    def knobs_for(self, portal: Portal | None) -> Knobs:
        if portal is None:
            return self.knobs
        overrides = self.portal_knobs.get(portal.member_id)
        return replace(self.knobs, **overrides) if overrides else self.knobs

    def set_knobs(self, values: dict[str, Any], portal: Portal | None = None) -> None:
        """Set knobs globally, or per portal (``None`` removes a portal override)."""
        coerced: dict[str, Any] = {}
        removals: list[str] = []
        for name, value in values.items():
            if portal is not None and name in GLOBAL_ONLY_KNOBS:
                raise KnobError(f"knob {name!r} is global only")
            if portal is not None and value is None:
                coerce_knob(name, getattr(Knobs(), name))  # validates the name
                removals.append(name)
                continue
            coerced[name] = coerce_knob(name, value)
        if portal is None:
            self.knobs = replace(self.knobs, **coerced)
            if "seed" in coerced:
                self.rng = random.Random(self.knobs.seed)  # noqa: S311
            return
        table = self.portal_knobs.setdefault(portal.member_id, {})
        table.update(coerced)
        for name in removals:
            table.pop(name, None)

    def roll(self, ratio: float) -> bool:
        """True with probability ``ratio`` (seeded; call with the lock held)."""
        if ratio <= 0:
            return False
        return self.rng.random() < ratio

    # -- tokens --------------------------------------------------------------------------------

    def issue_tokens(self, portal: Portal, user_id: int) -> TokenPair:
        knobs = self.knobs_for(portal)
        now = self.clock()
        pair = TokenPair(
            access_token=secrets.token_hex(32),
            refresh_token=secrets.token_hex(32),
            member_id=portal.member_id,
            user_id=user_id,
            client_id=self.client_id,
            scope=knobs.scope,
            issued_at=now,
            access_expires_at=now + knobs.token_ttl,
            refresh_expires_at=now + knobs.refresh_ttl,
        )
        self.access_tokens[pair.access_token] = pair
        self.refresh_tokens[pair.refresh_token] = pair
        portal.counters.tokens_issued += 1
        return pair

    def token_body(self, pair: TokenPair, portal: Portal) -> dict[str, Any]:
        """The OAuth server's token response (refresh / code exchange)."""
        now = self.clock()
        return {
            "access_token": pair.access_token,
            "expires": int(pair.access_expires_at),
            "expires_in": max(int(round(pair.access_expires_at - now)), 0),
            "scope": pair.scope,
            "domain": self.oauth_domain,
            "server_endpoint": self.server_endpoint,
            "status": APP_STATUS,
            "client_endpoint": self.client_endpoint(portal),
            "member_id": portal.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
        }

    def check_access_token(self, token: str) -> tuple[str, TokenPair | None]:
        """Return ``("ok"|"expired"|"unknown", pair)`` for an access token."""
        pair = self.access_tokens.get(token)
        if pair is None:
            return "unknown", None
        if pair.access_killed or self.clock() >= pair.access_expires_at:
            return "expired", pair
        return "ok", pair

    def revoke_portal_tokens(self, portal: Portal) -> int:
        """Forget every token of a portal (uninstall): they become unknown everywhere."""
        doomed = [p for p in self.access_tokens.values() if p.member_id == portal.member_id]
        for pair in doomed:
            self.access_tokens.pop(pair.access_token, None)
            self.refresh_tokens.pop(pair.refresh_token, None)
        return len(doomed)

    def expire_tokens(self, portal: Portal, user_id: int | None = None) -> int:
        """Force-expire live access tokens (refresh tokens keep working)."""
        count = 0
        for pair in self.access_tokens.values():
            if pair.member_id != portal.member_id or pair.access_killed:
                continue
            if user_id is not None and pair.user_id != user_id:
                continue
            pair.access_killed = True
            count += 1
        return count

    def live_token_count(self, portal: Portal) -> int:
        now = self.clock()
        return sum(
            1
            for p in self.access_tokens.values()
            if p.member_id == portal.member_id and not p.access_killed and now < p.access_expires_at
        )

    # -- installed app -------------------------------------------------------------------------

    @staticmethod
    def new_application_token() -> str:
        return secrets.token_hex(16)

    def ensure_application_token(self, portal: Portal) -> str:
        if not portal.application_token:
            portal.application_token = self.new_application_token()
        return portal.application_token

    def record_pin(
        self, portal: Portal, user_id: int, flow_id: int, value: bool, source: str
    ) -> None:
        portal.pin_log.append(
            {
                "ts": round(self.clock(), 3),
                "user_id": user_id,
                "flow_id": flow_id,
                "pinned": value,
                "source": source,
            }
        )

    # -- snapshot ------------------------------------------------------------------------------

    def _address_view(self, portal: Portal) -> dict[str, Any]:
        return {
            "domain": self.domain(portal),
            "display_domain": portal.domain,
            "origin": self.origin(portal),
            "old_origins": [f"http://{host}:{self.portal_port}" for host in portal.old_hosts],
            "client_endpoint": self.client_endpoint(portal),
            "page_url": self.page_url(portal),
        }

    def portal_snapshot(self, portal: Portal) -> dict[str, Any]:
        knobs = self.knobs_for(portal)
        return {
            "name": portal.name,
            "seed_name": portal.seed_name,
            "member_id": portal.member_id,
            **self._address_view(portal),
            "language": portal.language,
            "installed": portal.installed,
            "application_token": portal.application_token,
            "app_version": portal.app_version,
            "scope": knobs.scope,
            "placements": [
                {
                    "id": p.id,
                    "placement": p.placement,
                    "handler": p.handler,
                    "title": p.title,
                    "user_id": p.user_id,
                    "options": p.options,
                }
                for p in portal.placements
            ],
            "events": [
                {
                    "id": e.id,
                    "event": e.event,
                    "handler": e.handler,
                    "auth_type": e.user_id,
                    "offline": e.offline,
                }
                for e in portal.events
            ],
            "users": [
                {
                    "id": u.id,
                    "name": u.name,
                    "last_name": u.last_name,
                    "admin": u.admin,
                    "departments": u.departments,
                    "extranet": u.extranet,
                }
                for u in sorted(portal.users.values(), key=lambda u: u.id)
            ],
            "flows": [
                {
                    "id": f.id,
                    "name": f.name,
                    "active": f.active,
                    "access": f.access,
                    "visible_to": portal.flow_visible_to(f),
                    "task_count": sum(1 for t in portal.tasks.values() if t.flow_id == f.id),
                }
                for f in sorted(portal.flows.values(), key=lambda f: f.id)
            ],
            "task_count": len(portal.tasks),
            "pins": {str(uid): portal.pinned(uid) for uid in sorted(portal.users)},
            "pin_log": list(portal.pin_log)[-200:],
            "tokens": {"live_access_tokens": self.live_token_count(portal)},
            "knob_overrides": dict(self.portal_knobs.get(portal.member_id, {})),
            "counters": portal.counters.to_json(),
        }

    def snapshot(self, portal_name: str | None = None) -> dict[str, Any]:
        portals = (
            [self.portals[portal_name]] if portal_name is not None else list(self.portals.values())
        )
        return {
            "base_url": self.base_url,
            "distinct_hosts": self.distinct_hosts,
            "server_endpoint": self.server_endpoint,
            "app_url": self.app_url,
            "client_id": self.client_id,
            "knobs": asdict(self.knobs),
            "aliases": dict(self.aliases),
            "oauth": {"unknown_refresh_failures": self.oauth_unknown_failures},
            "portals": {p.name: self.portal_snapshot(p) for p in portals},
        }
