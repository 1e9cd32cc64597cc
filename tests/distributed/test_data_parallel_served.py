"""`engine serve --data-parallel-size 2` (a real server subprocess, SmolLM2 on CPU): two core
processes behind one API server answer completions the same as one would, the merged
metrics count every core's tokens once, and the death of the second core takes the server
down (503, then exit != 0) with no core left behind."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.entrypoints.serve_fixtures import pid_alive, start_server


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if match:
            total += float(match.group(2))
    return total


def test_dp2_server_answers_completions_and_a_dead_core_stops_it():
    server = start_server("--data-parallel-size", "2", "--served-model-name", "m",
                          "--max-model-len", "512", "--kv-cache-memory", "128m",
                          "--log-level", "warning")
    try:
        core0 = httpx.get(server.base_url + "/ready").json()["engine_core_pid"]
        cores = [p for p in _children(server.process.pid) if b"spawn_main" in _cmdline(p)]
        assert core0 in cores and len(cores) == 2, cores

        def complete(_: int) -> dict:
            r = httpx.post(server.base_url + "/v1/completions", timeout=120, json={
                "model": "m", "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0.0})
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(complete, range(4)))
        texts = {a["choices"][0]["text"] for a in answers}
        assert len(texts) == 1 and texts != {""}  # same greedy text from either core
        assert all(a["usage"]["completion_tokens"] == 8 for a in answers)
        metrics = httpx.get(server.base_url + "/metrics").text
        assert _metric(metrics, "engine:generation_tokens_total") == 32

        other = next(p for p in cores if p != core0)
        os.kill(other, signal.SIGKILL)
        killed_at = time.monotonic()
        while httpx.get(server.base_url + "/health").status_code != 503:
            assert time.monotonic() - killed_at < 20.0, "a dead core not noticed"
            time.sleep(0.02)
        assert "data-parallel rank 1" in httpx.get(server.base_url + "/health").text
        assert server.process.wait(timeout=60) != 0
        deadline = time.monotonic() + 45
        while pid_alive(core0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(core0)
    finally:
        server.stop()
