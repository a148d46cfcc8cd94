"""Batch, rate limit, operating time, and the fault knobs."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from .conftest import SandboxClient


def test_batch_results_by_key_and_errors(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    body = sb.call(
        "batch",
        token,
        halt=0,
        cmd={
            "me": "profile",
            "pin": "tasks.flow.Flow.pin?flowId=101",
            "bad": "tasks.flow.flow.pin?flowId=101",
            "denied": "tasks.flow.Flow.pin?flowId=106",
            "tasks": "tasks.task.list?filter[FLOW_ID]=101&select[]=ID",
            "ref": "tasks.task.get?taskId=$result[tasks][tasks][0][id]",
        },
    ).json()
    assert set(body) == {"result", "time"}
    result = body["result"]
    assert result["result"]["me"]["ID"] == "2"
    assert result["result"]["pin"] is True
    assert result["result"]["ref"]["task"]["id"] == result["result"]["tasks"]["tasks"][0]["id"]
    assert result["result_error"] == {
        "bad": {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"},
        "denied": {"error": "0", "error_description": "Access denied or flow not found"},
    }
    assert result["result_total"] == {"tasks": 5}
    assert result["result_next"] == []  # empty PHP array
    assert set(result["result_time"]) == {"me", "pin", "tasks", "ref"}
    counters = sb.state()["counters"]
    # the denied pin was executed too (and failed), so it counts as a call
    assert counters["calls"]["batch"] == 1 and counters["calls"]["tasks.flow.Flow.pin"] == 2


def test_batch_list_form_halt_and_length_limit(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    listed = sb.result("batch", token, cmd=["profile", "user.admin"])
    assert listed["result"][1] is False and listed["result_error"] == []
    halted = sb.result("batch", token, halt=1, cmd=["profile", "nope.method", "user.admin"])
    assert len(halted["result"]) == 1 and list(halted["result_error"]) == ["1"]

    cmd = {f"c{i}": "user.admin" for i in range(53)}
    big = sb.result("batch", token, cmd=cmd)
    assert len(big["result"]) == 50
    assert set(big["result_error"]) == {"c50", "c51", "c52"}
    assert big["result_error"]["c51"]["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"


def test_batch_is_one_bucket_request(sb: SandboxClient) -> None:
    token = sb.token()
    sb.config(portal="alpha", rate=0.01, burst=2)
    cmd = {f"p{i}": "profile" for i in range(20)}
    assert len(sb.result("batch", token, cmd=cmd)["result"]) == 20
    assert sb.call("profile", token).status_code == 200
    limited = sb.call("batch", token, cmd=cmd)
    assert limited.status_code == 503
    counters = sb.state()["counters"]
    assert counters["calls"]["profile"] == 21 and counters["http_503"] == 1


def test_leaky_bucket_is_per_portal(sb: SandboxClient) -> None:
    alpha, beta = sb.token("alpha"), sb.token("beta")
    sb.config(portal="alpha", rate=0.01, burst=5)
    statuses = [sb.call("profile", alpha).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [503, 503]
    assert sb.call("profile", alpha).json() == {
        "error": "QUERY_LIMIT_EXCEEDED",
        "error_description": "Too many requests",
    }
    assert sb.call("profile", beta, portal="beta").status_code == 200
    assert sb.state()["counters"]["http_503"] == 3
    sb.config(portal="alpha", rate=1000)  # drains immediately
    time.sleep(0.02)
    assert sb.call("profile", alpha).status_code == 200


def test_rejected_request_is_not_executed(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    sb.config(portal="alpha", rate=0.01, burst=1)
    assert sb.result("tasks.flow.Flow.pin", token, flowId=101) is True
    assert sb.call("tasks.flow.Flow.pin", token, flowId=101).status_code == 503
    assert sb.state()["pins"]["2"] == [101]


def test_operating_limit_blocks_one_method(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    sb.config(operating_cost=100, operating_limit=250)
    for _ in range(3):
        assert sb.call("tasks.task.list", token, select=["ID"]).status_code == 200
    blocked = sb.call("tasks.task.list", token, select=["ID"])
    assert blocked.status_code == 429
    body = blocked.json()
    assert body["error"] == "OPERATION_TIME_LIMIT"
    assert body["error_description"] == "Method is blocked due to operation time limit."
    assert body["time"]["operating"] == 300
    assert time.time() < body["time"]["operating_reset_at"] <= time.time() + 601
    assert sb.call("profile", token).status_code == 200  # other methods are unaffected
    # inside a batch the nested calls count (and are refused) individually
    batch = sb.result("batch", token, cmd={"a": "tasks.task.list", "b": "profile"})
    assert batch["result_error"]["a"]["error"] == "OPERATION_TIME_LIMIT"
    assert "b" in batch["result"]


def test_pin_drop_applies_toggle_but_loses_response(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    sb.config(pin_drop_ratio=1.0)
    with pytest.raises(requests.ConnectionError):
        sb.call("tasks.flow.Flow.pin", token, flowId=101)
    with pytest.raises(requests.ConnectionError):  # a pin inside a batch drops the whole batch
        sb.call("batch", token, cmd={"a": "profile", "b": "tasks.flow.Flow.pin?flowId=103"})
    state = sb.state()
    assert state["pins"]["2"] == [101, 103]
    assert state["counters"]["dropped_responses"] == 2
    assert [entry["source"] for entry in state["pin_log"]] == ["rest-dropped", "rest-dropped"]
    sb.config(pin_drop_ratio=0.0)
    assert sb.result("tasks.flow.Flow.pin", token, flowId=101) is False


def test_5xx_faults_have_no_side_effect(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)
    sb.config(error_5xx_ratio=1.0, seed=7)
    statuses = set()
    for _ in range(6):
        response = sb.call("tasks.flow.Flow.pin", token, flowId=101)
        statuses.add(response.status_code)
        if response.status_code == 502:
            assert response.headers["Content-Type"].startswith("text/html")
            assert "502 Bad Gateway" in response.text
        else:
            assert response.json()["error"] == "INTERNAL_SERVER_ERROR"
    assert statuses <= {500, 502} and len(statuses) == 2
    state = sb.state()
    assert state["pins"]["2"] == [] and state["counters"]["faults_5xx"] == 6
    sb.config(error_5xx_ratio=0.0)
    assert sb.result("tasks.flow.Flow.pin", token, flowId=101) is True


def test_latency_and_portal_deleted(sb: SandboxClient) -> None:
    token = sb.token()
    sb.config(portal="alpha", latency_ms=150)
    started = time.monotonic()
    assert sb.call("profile", token).status_code == 200
    assert time.monotonic() - started >= 0.15
    sb.config(portal="alpha", latency_ms=0, portal_deleted=True)
    deleted = sb.call("profile", token)
    assert deleted.status_code == 500 and deleted.json()["error"] == "PORTAL_DELETED"
    assert sb.call("profile", sb.token("beta"), portal="beta").status_code == 200


def test_traffic_counts_the_calls_served_at_once_across_portals(sb: SandboxClient) -> None:
    """Six slow calls at once on two portals: six in flight at the peak, about six on average
    while busy, none after; a POST starts the figures afresh."""
    tokens = {"alpha": sb.token(), "beta": sb.token("beta")}
    sb.config(latency_ms=400)
    sb.control("traffic", {})
    calls = [
        threading.Thread(target=sb.call, args=("profile", tokens[name], name))
        for name in ("alpha", "beta", "alpha", "beta", "alpha", "beta")
    ]
    for call in calls:
        call.start()
    for call in calls:
        call.join()
    seen = sb.control("traffic")
    assert seen["calls"] == 6 and seen["peak"] == 6 and seen["in_flight"] == 0
    assert 4.5 <= seen["mean_in_flight"] <= 6.0
    assert 0.4 <= seen["busy_seconds"] < 1.2
    sb.config(latency_ms=0)
    assert sb.call("profile", tokens["alpha"]).status_code == 200
    assert sb.control("traffic")["peak"] == 6  # a peak stays until the figures start afresh
    afresh = sb.control("traffic", {})
    assert afresh["calls"] == 0 and afresh["peak"] == 0


def test_a_batch_runs_in_order_and_a_chosen_command_fails_or_cuts_it(sb: SandboxClient) -> None:
    """Toggle pairs: the second command of the flow-101 pair fails, then the portal dies at it."""
    token = sb.token(user_id=2)
    pairs = {"a": "tasks.flow.Flow.pin?flowId=101", "b": "tasks.flow.Flow.pin?flowId=101"}
    pairs |= {"c": "tasks.flow.Flow.pin?flowId=103", "d": "tasks.flow.Flow.pin?flowId=103"}
    both = sb.result("batch", token, halt=1, cmd=pairs)
    assert list(both["result"]) == ["a", "b", "c", "d"]  # in order, each with its own answer
    assert [both["result"][k] for k in "abcd"] == [True, False, True, False]
    assert sb.state()["pins"]["2"] == []  # each pair flipped and flipped back

    sb.config(portal="alpha", batch_fail_at=1, batch_fail_code="OPERATION_TIME_LIMIT")
    failed = sb.result("batch", token, halt=1, cmd=pairs)
    assert list(failed["result"]) == ["a"] and list(failed["result_error"]) == ["b"]
    assert failed["result_error"]["b"]["error"] == "OPERATION_TIME_LIMIT"
    assert sb.state()["pins"]["2"] == [101]  # left flipped; halt kept c and d from running
    sb.result("tasks.flow.Flow.pin", token, flowId=101)  # put it back

    sb.config(portal="alpha", batch_fail_at=-1, batch_cut_at=2)
    with pytest.raises(requests.ConnectionError):
        sb.call("batch", token, halt=1, cmd=pairs)
    assert sb.state()["pins"]["2"] == []  # a and b ran (101 flipped back), c and d did not
    assert sb.state()["counters"]["dropped_responses"] == 1
