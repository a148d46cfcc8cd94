"""Seed data: the deterministic portals a sandbox starts (and resets) with.

The same seed name always gives the same member_id, users, flows and tasks, so tests and
benchmarks can hard-code ids: ``alpha`` and ``beta`` are hand-written tables, ``p3``, ``p4``,
... are generated from a random generator seeded with the name.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime

from .model import Department, Flow, Portal, Task, User, iso

SEED_PORTALS = ("alpha", "beta")

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
