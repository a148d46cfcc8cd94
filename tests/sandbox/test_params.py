"""PHP-style bracket parameters, as unit functions and over HTTP."""

from __future__ import annotations

from urllib.parse import urlencode

import requests

from sandbox.params import flatten, parse_body, parse_php_query, php_array

from .conftest import SandboxClient


def test_brackets_build_nested_maps_and_lists() -> None:
    parsed = parse_php_query(
        "filter[ID]=1&select[]=ID&select[]=TITLE&order[0]=x&order[1]=y"
        "&filter[@ID][]=5&filter[@ID][]=6&deep[a][b][c]=z&plain=v&empty="
    )
    assert parsed == {
        "filter": {"ID": "1", "@ID": ["5", "6"]},
        "select": ["ID", "TITLE"],
        "order": ["x", "y"],
        "deep": {"a": {"b": {"c": "z"}}},
        "plain": "v",
        "empty": "",
    }


def test_non_sequential_numeric_keys_stay_a_map_and_append_continues() -> None:
    assert parse_php_query("n[5]=a&n[]=b") == {"n": {"5": "a", "6": "b"}}
    assert parse_php_query("cmd[b]=x&cmd[a]=y") == {"cmd": {"b": "x", "a": "y"}}


def test_php_array_rules_and_flatten_roundtrip() -> None:
    assert php_array({}) == []
    assert php_array({0: "a", 1: "b"}) == ["a", "b"]
    assert php_array({"1": "a"}) == {"1": "a"}
    nested = {"event": "X", "data": {"CLEAN": True, "L": [1, 2]}, "auth": {"skip": None}}
    pairs = flatten(nested)
    assert pairs == [("event", "X"), ("data[CLEAN]", "1"), ("data[L][0]", "1"), ("data[L][1]", "2")]
    assert parse_php_query(urlencode(pairs)) == {
        "event": "X",
        "data": {"CLEAN": "1", "L": ["1", "2"]},
    }


def test_body_decoding_by_content_type() -> None:
    assert parse_body(b'{"a": [1]}', "application/json; charset=utf-8") == {"a": [1]}
    assert parse_body(b"a[x]=1", "application/x-www-form-urlencoded") == {"a": {"x": "1"}}
    assert parse_body(b'{"a": 2}', "") == {"a": 2}  # unlabelled JSON is still JSON


def test_form_encoded_bracket_params_reach_the_method(sb: SandboxClient) -> None:
    token = sb.token(user_id=1)
    body = urlencode(
        [("auth", token), ("filter[FLOW_ID]", "103"), ("select[]", "ID"), ("select[]", "FLOW_ID")]
    )
    response = requests.post(
        f"{sb.endpoint()}tasks.task.list",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    tasks = response.json()["result"]["tasks"]
    assert tasks and {t["flowId"] for t in tasks} == {"103"}
    assert set(tasks[0]) == {"id", "flowId"}


def test_query_string_brackets_with_get(sb: SandboxClient) -> None:
    token = sb.token(user_id=1)
    query = urlencode([("auth", token), ("filter[@ID][0]", "101"), ("filter[@ID][1]", "104")])
    response = requests.get(f"{sb.endpoint()}tasks.flow.Flow.list.json?{query}", timeout=10)
    assert response.status_code == 200, response.text
    assert [f["id"] for f in response.json()["result"]] == [101, 104]
