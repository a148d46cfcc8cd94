"""One process supervisor for `make run` / `make demo`, the benchmarks and the tests.

Every command starts in its own process group (a new session), so one signal reaches the process
and whatever it forked (gunicorn's workers, a Celery pool) and a Ctrl-C in the terminal reaches
only the launcher, which stops them in order. A process can be waited for (a port, an HTTP URL,
a line in its log), paused and resumed (SIGSTOP / SIGCONT), and stopped: SIGTERM to the group,
a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


class StartError(RuntimeError):
    """A process exited, or did not get ready in time, while it was being waited for."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_answers(url: str) -> bool:
    """The URL answers, with anything but a server error."""
    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.RequestException:
        return False


class Process:
    """A command running in its own process group, with its output in `log_path` (if any)."""

    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], log_path: Path | None, offset: int
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self._offset = offset  # where this process's output starts in an appended log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process wrote to its log so far."""
        if self.log_path is None:
            return ""
        return self.log_path.read_bytes()[self._offset :].decode(errors="replace")

    # -- waiting ---------------------------------------------------------------------------------
    def wait_for(
        self, ready: Callable[[], bool], seconds: float, what: str, step: float = 0.2
    ) -> None:
        """Poll `ready()` until it holds; StartError if the process exits or time runs out."""
        deadline = time.monotonic() + seconds
        while True:
            if self.poll() is not None:
                raise StartError(
                    f"{self.name} exited (code {self.poll()}) before {what}:\n"
                    f"{self.output()[-3000:]}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise StartError(
                    f"timed out after {seconds:.0f}s waiting for {what}:\n{self.output()[-3000:]}"
                )
            time.sleep(step)

    def wait_for_port(self, port: int, seconds: float = 15.0) -> None:
        self.wait_for(lambda: port_open(port), seconds, f"{self.name} on port {port}", step=0.1)

    def wait_for_http(self, url: str, seconds: float = 30.0) -> None:
        self.wait_for(lambda: http_answers(url), seconds, f"{self.name} to answer {url}")

    def wait_for_log(self, marker: str, seconds: float = 40.0) -> None:
        """Until the process's own output holds `marker` (a Celery worker's `ready.`)."""
        self.wait_for(lambda: marker in self.output(), seconds, f"{self.name} to log {marker!r}")

    # -- signals ---------------------------------------------------------------------------------
    def send(self, sig: int) -> None:
        """Send `sig` to the whole process group, if the process still runs."""
        if self.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """Stop it where it stands (SIGSTOP); whatever it consumes waits for it."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def reap(self, seconds: float) -> bool:
        """Wait up to `seconds` for it to exit, then SIGKILL the group; True if it was killed."""
        try:
            self.popen.wait(timeout=max(0.1, seconds))
            return False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
            return True

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 15.0) -> None:
        """Signal the group (SIGTERM unless told), wait, and SIGKILL it if it lingers."""
        if self.poll() is not None:
            return
        self.send(sig)
        self.reap(seconds)

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) of the largest process in its process group."""
        pids = subprocess.run(
            ["pgrep", "-g", str(self.pid)], capture_output=True, text=True
        ).stdout.split()
        peaks = []
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match:
                peaks.append(int(match.group(1)) / 1024)
        return max(peaks) if peaks else 0.0


def start(
    name: str,
    cmd: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    log: Path | None = None,
    quiet: bool = False,
) -> Process:
    """Start `cmd` in a new process group. Its output goes to `log` (appended: a restarted
    process keeps its predecessor's lines, but waits only on its own), to nowhere when `quiet`,
    else to this process's terminal."""
    if log is None:
        stream = subprocess.DEVNULL if quiet else None
        popen = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=stream, stderr=stream, start_new_session=True
        )
        return Process(name, popen, None, 0)
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        popen = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, popen, log, offset)


class Supervisor:
    """Named processes started with one environment and working directory, stopped together."""

    def __init__(
        self, *, env: Mapping[str, str] | None = None, cwd: Path = ROOT, log_dir: Path | None = None
    ) -> None:
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_dir = log_dir  # each process's output in <log_dir>/<name>.log, else the terminal
        self.procs: dict[str, Process] = {}

    def start(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> Process:
        """Start `cmd` as `name`, with `env` over the supervisor's environment."""
        merged = {**(self.env or os.environ), **(env or {})}
        log = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        proc = start(name, cmd, env=merged, cwd=self.cwd, log=log)
        self.procs[name] = proc
        return proc

    def first_exit(self) -> tuple[str, int] | None:
        """The first process (in start order) that has exited, with its code."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, name: str, seconds: float = 15.0) -> None:
        self.procs.pop(name).stop(seconds=seconds)

    def stop_all(self, seconds: float = 10.0, on_kill: Callable[[str], None] | None = None) -> None:
        """SIGTERM every group at once (last started first), give them `seconds` in all, then
        SIGKILL whichever lingers (and tell `on_kill(name)`)."""
        started = list(self.procs.items())
        for _, proc in reversed(started):
            proc.send(signal.SIGTERM)
        deadline = time.monotonic() + seconds
        for name, proc in reversed(started):
            if proc.reap(deadline - time.monotonic()) and on_kill is not None:
                on_kill(name)
        self.procs.clear()
