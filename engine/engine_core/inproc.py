"""The in-process engine-core client used by `LLM`: each `get_output` runs one step."""

from __future__ import annotations

from engine.engine_core.client import EngineCoreClient
from engine.engine_core.core import EngineCore
from engine.messages.core import EngineCoreOutputs, EngineCoreRequest


class InprocClient(EngineCoreClient):
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.core.step()

    def shutdown(self) -> None:
        self.core.shutdown()
