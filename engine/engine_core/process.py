"""The engine core in its own process: a busy loop between two ZMQ sockets.

Rule: the core never waits on the API server. It drains whatever requests have arrived,
runs one `step()` while there is work, pushes the outputs (unbounded send queue, no
acknowledgements) and only blocks on its input socket when it is idle. It exits on a
SHUTDOWN message, when its parent process is gone, or after reporting an exception that
escaped a step (a device or worker failure). What one request does wrong stays with that
request: refused when added (REQUEST_ERROR), or finished with FinishReason.ERROR while it
runs (the worker and the scheduler isolate it), and the core goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Optional

import zmq

from engine.config import EngineConfig
from engine.engine_args import EngineArgs
from engine.engine_core.transport import (
    UTILITY_METHODS,
    OutputType,
    RequestError,
    RequestType,
    UtilityCall,
    UtilityResult,
    decode_request,
    encode,
)
from engine.messages.core import EngineCoreOutputs

logger = logging.getLogger(__name__)

# How long an idle core blocks on its input before checking that its parent still lives.
_IDLE_POLL_MS = 200


class EngineCoreProc:
    """Owns an EngineCore and the two sockets; `run()` is the busy loop."""

    def __init__(self, core: Any, ctx: zmq.Context, input_address: str, output_address: str,
                 parent_pid: int) -> None:
        self.core = core
        self.parent_pid = parent_pid
        self.input_socket = ctx.socket(zmq.PULL)
        self.input_socket.connect(input_address)
        self.output_socket = ctx.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.SNDHWM, 0)  # never block the step loop on a reader
        self.output_socket.setsockopt(zmq.LINGER, 1000)
        self.output_socket.connect(output_address)
        self._changed = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input_socket, zmq.POLLIN)
        while True:
            # `changed`: requests arrived or were aborted since the last step, so one more
            # step reports fresh stats (KV-cache usage back at 0 after aborts) even if idle.
            if not (self._changed or self.core.has_unfinished_requests()):
                if not poller.poll(_IDLE_POLL_MS):
                    if not self._parent_alive():
                        return
                    continue
            if not self._drain_input() or not self._parent_alive():
                return
            self._changed = False
            outputs: EngineCoreOutputs = self.core.step()
            if outputs.outputs or outputs.scheduler_stats is not None:
                self.output_socket.send_multipart(encode(OutputType.OUTPUTS, outputs), copy=False)

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _drain_input(self) -> bool:
        """Handle every queued message; False on SHUTDOWN."""
        while True:
            try:
                frames = self.input_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            tag, payload = decode_request(frames)
            if tag is RequestType.SHUTDOWN:
                return False
            self._handle(tag, payload)
            self._changed = True

    def _handle(self, tag: RequestType, payload: Any) -> None:
        if tag is RequestType.ADD:
            try:
                self.core.add_request(payload)
            except Exception as exc:  # a request the core cannot hold; others go on
                if not isinstance(exc, ValueError):
                    logger.exception("Adding request %r failed", payload.request_id)
                message = str(exc) if isinstance(exc, ValueError) else \
                    f"{type(exc).__name__}: {exc}"
                err = RequestError(request_id=payload.request_id, message=message)
                self.output_socket.send_multipart(encode(OutputType.REQUEST_ERROR, err))
        elif tag is RequestType.ABORT:
            self.core.abort_requests(payload)
        elif tag is RequestType.UTILITY:
            self._call_utility(payload)

    def _call_utility(self, call: UtilityCall) -> None:
        result = UtilityResult(call_id=call.call_id)
        try:
            if call.method not in UTILITY_METHODS:
                raise ValueError(f"Unknown utility method {call.method!r}; "
                                 f"allowed: {sorted(UTILITY_METHODS)}.")
            if call.method == "ping":
                result.result = "pong"
            else:
                result.result = getattr(self.core, call.method)(*call.args)
        except Exception as exc:  # reported to the caller, the core keeps running
            result.error = f"{type(exc).__name__}: {exc}"
        self.output_socket.send_multipart(encode(OutputType.UTILITY_RESULT, result))


def run_engine_core(config: EngineConfig | EngineArgs, input_address: str, output_address: str,
                    ready_conn: Connection, parent_pid: int, log_level: str) -> None:
    """Entry point of the core process (a `multiprocessing` spawn target).

    Given `EngineArgs`, the core resolves the config itself, so the parent can resolve its
    own copy (for the tokenizer and limits) at the same time instead of before the spawn."""
    # Ctrl-C reaches the whole process group; the parent decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    proc: Optional[EngineCoreProc] = None
    try:
        from engine.engine_core.core import EngineCore

        if isinstance(config, EngineArgs):
            config = config.create_config()
        core = EngineCore(config)
        proc = EngineCoreProc(core, ctx, input_address, output_address, parent_pid)
        ready_conn.send({"status": "ready", "timings": dict(getattr(core, "startup_timings", {}))})
        proc.run()
        core.shutdown()
    except SystemExit:
        pass
    except BaseException:
        message = traceback.format_exc()
        logger.error("Engine core failed:\n%s", message)
        if proc is None:
            ready_conn.send({"status": "failed", "error": message})
        else:
            proc.output_socket.send_multipart(encode(OutputType.ERROR, message))
        ctx.destroy(linger=1000)
        os._exit(1)
    ctx.destroy(linger=1000)


@dataclass
class CoreProcessHandle:
    """The parent's view of a running core process and its socket addresses."""

    process: BaseProcess
    input_address: str
    output_address: str
    ready_conn: Connection
    ipc_dir: str
    startup_timings: dict[str, float] = field(default_factory=dict)

    def wait_until_ready(self, timeout_s: Optional[float] = None) -> dict[str, float]:
        """Block until the core has loaded the model; raise if it failed or died."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.ready_conn.poll(0.05):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"Engine core process exited with code {self.process.exitcode} during startup."
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Engine core not ready after {timeout_s} s.")
        message = self.ready_conn.recv()
        if message["status"] != "ready":
            raise RuntimeError(f"Engine core failed to start:\n{message['error']}")
        self.startup_timings = message["timings"]
        return self.startup_timings

    def stop(self, timeout_s: float = 5.0) -> None:
        """Wait for the core to leave (after SHUTDOWN was sent), then make sure it has."""
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def new_ipc_addresses() -> tuple[str, str, str]:
    """(directory, input address, output address) for a fresh pair of ipc sockets."""
    ipc_dir = tempfile.mkdtemp(prefix="engine-ipc-")
    return ipc_dir, f"ipc://{ipc_dir}/input", f"ipc://{ipc_dir}/output"


def launch_engine_core(config: EngineConfig | EngineArgs, ipc_dir: str, input_address: str,
                       output_address: str, log_level: str = "info") -> CoreProcessHandle:
    """Start the core process; the caller has already bound both addresses."""
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=run_engine_core,
        name="EngineCore",
        args=(config, input_address, output_address, child_conn, os.getpid(), log_level),
        daemon=True,
    )
    process.start()
    child_conn.close()
    return CoreProcessHandle(process, input_address, output_address, parent_conn, ipc_dir)
