"""How front ends (the `LLM` class, the API server) talk to an engine core.

Rule: one interface, two transports. `InprocClient` runs the core in this process and
steps it on demand; the multiprocess client (see `engine_core/process.py`) sends the same
msgspec messages over ZMQ to a core running its busy loop in another process.
"""

from __future__ import annotations

import abc

from engine.messages.core import EngineCoreOutputs, EngineCoreRequest


class EngineCoreClient(abc.ABC):
    @abc.abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abc.abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """The next outputs: in-process, runs one step; over ZMQ, waits for the core's next."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...
