"""Clients of an engine core running in another process (see `process.py`).

Rule: the client binds both sockets and owns the core process; it learns of the core's
death from the process sentinel, never from a timeout, and then fails loudly
(`EngineDeadError`) instead of waiting for outputs that will never come.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Optional

import zmq
import zmq.asyncio

from engine.config import EngineConfig
from engine.engine_args import EngineArgs
from engine.engine_core.client import EngineCoreClient
from engine.engine_core.process import (
    CoreProcessHandle,
    launch_engine_core,
    new_ipc_addresses,
)
from engine.engine_core.transport import (
    OutputType,
    RequestType,
    UtilityCall,
    UtilityResult,
    decode_output,
    encode,
)
from engine.messages.core import EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core process has exited; nothing more will come from it."""


class _MPClientBase:
    """Sockets and process shared by the sync and async clients."""

    def __init__(self, config: EngineConfig | EngineArgs, ctx: zmq.Context,
                 log_level: str) -> None:
        ipc_dir, input_address, output_address = new_ipc_addresses()
        self.ctx = ctx
        self.input_socket = ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.bind(input_address)
        self.output_socket = ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.RCVHWM, 0)
        self.output_socket.bind(output_address)
        self.handle: CoreProcessHandle = launch_engine_core(
            config, ipc_dir, input_address, output_address, log_level
        )
        self._call_ids = itertools.count()
        self._closed = False

    def wait_until_ready(self, timeout_s: Optional[float] = None) -> dict[str, float]:
        """Block until the core has loaded the model; its startup timings."""
        return self.handle.wait_until_ready(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self.handle.process.is_alive()

    @property
    def pid(self) -> Optional[int]:
        return self.handle.process.pid

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.is_alive:
            try:
                self.input_socket.send_multipart(encode(RequestType.SHUTDOWN, None), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.handle.stop()
        self.ctx.destroy(linger=0)


class SyncMPClient(_MPClientBase, EngineCoreClient):
    """Blocking client (`EngineCoreClient`): for front ends without an event loop."""

    def __init__(self, config: EngineConfig | EngineArgs, log_level: str = "info") -> None:
        super().__init__(config, zmq.Context(), log_level)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.input_socket.send_multipart(encode(RequestType.ADD, request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.input_socket.send_multipart(encode(RequestType.ABORT, request_ids))

    def get_output(self) -> EngineCoreOutputs:
        while True:
            tag, payload = self._recv()
            if tag is OutputType.OUTPUTS:
                return payload
            if tag is OutputType.REQUEST_ERROR:
                raise ValueError(payload.message)

    def call_utility(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        self.input_socket.send_multipart(
            encode(RequestType.UTILITY, UtilityCall(call_id, method, list(args)))
        )
        while True:
            tag, payload = self._recv()
            if tag is OutputType.UTILITY_RESULT and payload.call_id == call_id:
                return _utility_value(payload)

    def _recv(self) -> tuple[OutputType, Any]:
        if self._closed:
            raise EngineDeadError("The engine-core client was shut down.")
        while not self.output_socket.poll(100):
            if not self.is_alive:
                raise EngineDeadError(f"Engine core exited (code {self.handle.process.exitcode}).")
        tag, payload = decode_output(self.output_socket.recv_multipart())
        if tag is OutputType.ERROR:
            raise EngineDeadError(f"Engine core failed:\n{payload}")
        return tag, payload

    def shutdown(self) -> None:
        self._close()


class AsyncMPClient(_MPClientBase):
    """asyncio client for the API server: sends never block, `get_output_async` awaits."""

    def __init__(self, config: EngineConfig | EngineArgs, log_level: str = "info") -> None:
        super().__init__(config, zmq.asyncio.Context(), log_level)
        self._utility_futures: dict[int, asyncio.Future] = {}

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self._check_alive()
        await self.input_socket.send_multipart(encode(RequestType.ADD, request))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and self.is_alive:
            await self.input_socket.send_multipart(encode(RequestType.ABORT, request_ids))

    def abort_requests_nowait(self, request_ids: list[str]) -> None:
        """Queue an abort without awaiting (the send completes at once: no HWM)."""
        if request_ids and self.is_alive:
            self.input_socket.send_multipart(encode(RequestType.ABORT, request_ids))

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        """Run an allow-listed core method; the output loop must be running to answer."""
        self._check_alive()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._utility_futures[call_id] = future
        await self.input_socket.send_multipart(
            encode(RequestType.UTILITY, UtilityCall(call_id, method, list(args)))
        )
        return _utility_value(await future)

    async def get_output_async(self) -> tuple[OutputType, Any]:
        """The next OUTPUTS or REQUEST_ERROR message (utility results are resolved here)."""
        while True:
            tag, payload = decode_output(await self.output_socket.recv_multipart())
            if tag is OutputType.UTILITY_RESULT:
                future = self._utility_futures.pop(payload.call_id, None)
                if future is not None and not future.done():
                    future.set_result(payload)
                continue
            if tag is OutputType.ERROR:
                raise EngineDeadError(f"Engine core failed:\n{payload}")
            return tag, payload

    def watch_death(self, on_death: Any) -> None:
        """Call `on_death()` on this loop as soon as the core process exits."""
        loop = asyncio.get_running_loop()
        sentinel = self.handle.process.sentinel

        def _fire() -> None:
            loop.remove_reader(sentinel)
            for future in self._utility_futures.values():
                if not future.done():
                    future.set_exception(EngineDeadError("Engine core exited."))
            on_death()

        loop.add_reader(sentinel, _fire)

    def death_reason(self) -> str:
        return f"the engine core process exited (code {self.handle.process.exitcode})"

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"Engine core exited (code {self.handle.process.exitcode}).")

    def shutdown(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.handle.process.sentinel)
        except (RuntimeError, ValueError):
            pass
        self._close()


def _utility_value(result: UtilityResult) -> Any:
    if result.error is not None:
        raise RuntimeError(f"Engine core utility call failed: {result.error}")
    return result.result
