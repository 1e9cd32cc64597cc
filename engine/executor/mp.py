"""One process per device on this host: the `mp` executor.

Rule: every rank runs in its own worker process, rank 0 included, so the engine-core process
holds no torch.distributed state (engines can be created and destroyed one after another in
one process, and the core's scheduling never waits behind a forward). Each call goes to every
worker in the same order over ZMQ (pickled once, sent to each); every worker answers, and the
driver's (rank 0) answer is the result. While waiting, the executor watches each worker
process: one that dies fails the engine within a poll interval, with its rank, pid and exit
status, instead of leaving the others hanging in a collective.

Calls may overlap (pipeline parallelism): `execute_model_async` sends a step and returns a
handle at once. A worker answers calls in the order it got them, so rank r's n-th answer is
the n-th call's; answers for later calls that arrive while an earlier one is awaited are
kept until asked for. The step output used is the first rank of the last pipeline stage's;
every stage learns what it sampled from the scheduler's next output.

Workers are started with `subprocess` (not `multiprocessing`) because the engine core itself
runs in a daemonic process when served, and daemonic processes may not have children.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any, Optional

from engine.config import EngineConfig
from engine.distributed import free_port
from engine.executor.abstract import RankedExecutor
from engine.worker.worker import SHUTDOWN
from platforms.interface import Platform

logger = logging.getLogger(__name__)

_POLL_MS = 100  # how often a waiting executor checks that its workers are alive
_SHUTDOWN_GRACE_S = 20.0  # waited only while workers are slow (a loaded machine)
_PEER_DEATH_GRACE_S = 1.0  # how long a worker's error waits for a peer's death to show
_WORKER_ENTRY = "from engine.worker.worker import main; main()"


def _stop_processes(procs: list[subprocess.Popen], ipc_dir: str) -> None:
    """Terminate what is still running (kill after a grace period); remove the sockets."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + _SHUTDOWN_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(ipc_dir, ignore_errors=True)


class MultiprocExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        import zmq

        self._set_layout(config)
        self._num_calls = 0  # calls sent so far; a call's index is its order
        self._num_answers = [0] * self.world_size  # answers received per rank
        self._answers: dict[int, dict[int, Any]] = {}  # call index -> {rank: payload}
        self._ctx = zmq.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="engine-mp-")
        self._inboxes = []
        self._outbox = self._ctx.socket(zmq.PULL)
        self._outbox.bind(f"ipc://{self._ipc_dir}/out")
        self.procs: list[subprocess.Popen] = []
        self._failure: Optional[str] = None
        self._finalizer = weakref.finalize(self, _stop_processes, self.procs, self._ipc_dir)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        # Host threads shared by every worker of every data-parallel replica on this host.
        num_threads = max(1, (os.cpu_count() or 1) //
                          (self.world_size * config.parallel.data_parallel_size))
        for rank in range(self.world_size):
            inbox = self._ctx.socket(zmq.PUSH)
            address = f"ipc://{self._ipc_dir}/in{rank}"
            inbox.bind(address)
            self._inboxes.append(inbox)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", _WORKER_ENTRY, address, f"ipc://{self._ipc_dir}/out",
                 str(rank), str(os.getpid())],
            ))
        start = pickle.dumps((config, platform.name, init_method, num_threads))
        try:
            for inbox in self._inboxes:
                self._send(inbox, start, "start")
            self._collect("start", self._next_call())  # answered once its groups exist
        except Exception:
            self.shutdown()
            raise
        logger.info("mp executor: %d workers (pids %s), rendezvous %s, %d threads each",
                    self.world_size, [p.pid for p in self.procs], init_method, num_threads)

    # ---- calls ----
    def _submit(self, method: str, *args: Any) -> int:
        """Send `method(*args)` to every worker; the call's index (for `_collect`)."""
        self._raise_if_failed()
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for inbox in self._inboxes:
            self._send(inbox, message, method)
        return self._next_call()

    def _next_call(self) -> int:
        self._num_calls += 1
        return self._num_calls - 1

    def _send(self, inbox: Any, message: bytes, method: str) -> None:
        """Send without blocking on a dead peer (a PUSH socket whose peer is gone would
        wait forever): retry while every worker is alive."""
        import zmq

        while True:
            try:
                inbox.send(message, zmq.NOBLOCK)
                return
            except zmq.Again:
                self._check_alive(method)
                inbox.poll(_POLL_MS, zmq.POLLOUT)

    def _collect(self, method: str, call: int) -> list[Any]:
        """Every worker's answer to call number `call`, in rank order."""
        results = self._answers.setdefault(call, {})
        while len(results) < self.world_size:
            self._raise_if_failed()
            if self._outbox.poll(_POLL_MS):
                rank, ok, payload = pickle.loads(self._outbox.recv())
                if not ok:
                    self._blame_dead_peer(method)  # a peer's death explains the error
                    self._fail(f"worker rank {rank} raised in {method}:\n{payload}")
                index = self._num_answers[rank]
                self._num_answers[rank] += 1
                self._answers.setdefault(index, {})[rank] = payload
                continue
            self._check_alive(method)
        del self._answers[call]
        return [results[r] for r in range(self.world_size)]

    def _blame_dead_peer(self, method: str) -> None:
        """A survivor's collective fails as soon as a killed peer's sockets close, which can
        be a moment before the peer's exit is visible: give a death that long to show, so
        the error names the dead rank rather than the survivor that noticed."""
        deadline = time.monotonic() + _PEER_DEATH_GRACE_S
        while True:
            self._check_alive(method)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _check_alive(self, method: str) -> None:
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                self._fail(
                    f"worker rank {rank} (pid {proc.pid}) died ({how}) during {method}; the "
                    "engine cannot continue with a rank missing. Restart it; check the "
                    "worker's log above and host memory (an out-of-memory kill is SIGKILL)."
                )

    def shutdown(self) -> None:
        """Ask every worker to exit (they destroy their groups), then make sure they did."""
        if not self._finalizer.alive:
            return
        if self._failure is None:
            import zmq

            message = pickle.dumps((SHUTDOWN, ()))
            for inbox in self._inboxes:
                try:
                    inbox.send(message, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # that worker is gone; the finalizer below makes sure
            deadline = time.monotonic() + _SHUTDOWN_GRACE_S
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
        self._finalizer()  # terminates stragglers, removes the socket directory
        for sock in [*self._inboxes, self._outbox]:
            sock.close(linger=0)
        self._ctx.term()

