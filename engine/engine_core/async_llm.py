"""`AsyncLLM`: the API server's engine, with the core in another process.

Rule: one output-loop task owns everything that comes back from the core. It turns
`EngineCoreOutputs` into `RequestOutput`s (OutputProcessor), aborts stop-string hits in the
core, records metrics and puts each output on its request's queue; request handlers only
read their own queue. A request whose consumer goes away is aborted, so its KV blocks are
freed. When the core process dies every pending request fails with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Optional, Union

from engine.config import EngineConfig
from engine.engine_args import EngineArgs
from engine.engine_core.mp_client import AsyncMPClient, EngineDeadError
from engine.engine_core.transport import OutputType
from engine.messages.core import LoRARequest, SchedulerStats
from engine.outputs.request_output import RequestOutput, failure_of
from engine.sampling_params import InvalidParameter, SamplingParams

logger = logging.getLogger(__name__)


class ProcessedPrompt(NamedTuple):
    """A prompt already tokenized and validated (see `AsyncLLM.process`)."""

    text: Optional[str]
    token_ids: list[int]
    params: SamplingParams


class StatsObserver:
    """What the output loop reports to (e.g. `engine.metrics.EngineMetrics`)."""

    def on_scheduler_stats(self, stats: SchedulerStats) -> None: ...

    def on_request_output(self, output: RequestOutput, now: float) -> None: ...


class AsyncLLM:
    """`AsyncLLM.start(config)`, then `begin()` on the event loop, then `generate(...)`."""

    def __init__(self, config: EngineConfig, client: AsyncMPClient, tokenizer: Any,
                 startup_timings: dict[str, float]) -> None:
        from engine import tokenizer as tokenizer_module
        from engine.inputs import InputProcessor
        from engine.outputs.output_processor import OutputProcessor

        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.startup_timings = startup_timings
        model = config.model
        self.input_processor = InputProcessor(
            tokenizer, max_model_len=model.max_model_len, max_logprobs=config.max_logprobs,
            generation_defaults=model.generation_defaults, chat_template=model.chat_template,
            vocab_size=max(model.vocab_size, len(tokenizer)),
            structured_outputs_backend=config.structured_outputs_backend,
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.eos_token_id = _eos_token_id(tokenizer_module, model, tokenizer)
        self.observers: list[StatsObserver] = []
        self.latest_stats = SchedulerStats()
        self.dead_reason: Optional[str] = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._output_task: Optional[asyncio.Task] = None
        self._on_death: list[Callable[[], None]] = []

    @classmethod
    def start(cls, engine_args: EngineArgs, log_level: str = "info") -> AsyncLLM:
        """Launch the core first, then resolve the config and load the tokenizer here while
        the core loads the model; return once the core is ready. Raises ValueError for a
        bad configuration, RuntimeError when the core fails to start."""
        from engine.engine_core.dp import make_async_client
        from engine.tokenizer import load_tokenizer

        t0 = time.perf_counter()
        client = make_async_client(engine_args, log_level)  # one core, or one per dp rank
        timings: dict[str, float] = {}
        try:
            config = engine_args.create_config()
            timings["config (in parallel)"] = time.perf_counter() - t0
            tokenizer = load_tokenizer(config.model)
            timings["tokenizer (in parallel)"] = time.perf_counter() - t0
            timings.update(client.wait_until_ready())
        except BaseException:
            client.shutdown()
            raise
        timings["core ready"] = time.perf_counter() - t0
        return cls(config, client, tokenizer, timings)

    # ---- lifecycle ----
    def begin(self, on_death: Optional[Callable[[], None]] = None) -> None:
        """Start the output loop and the death watch on the running event loop."""
        if on_death is not None:
            self._on_death.append(on_death)
        self._output_task = asyncio.get_running_loop().create_task(self._output_loop())
        self.client.watch_death(lambda: self._mark_dead(self.client.death_reason()))

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self.client.is_alive

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.client.shutdown()

    # ---- requests ----
    def process(self, prompt: Union[str, list[int]], params: SamplingParams,
                prompt_text: Optional[str] = None) -> ProcessedPrompt:
        """Tokenize and validate now (ValueError), so a server can answer 400 before it
        starts a stream."""
        text, token_ids, params = self.input_processor.process(prompt, params)
        return ProcessedPrompt(prompt_text if prompt_text is not None else text, token_ids,
                               params)

    async def generate(self, prompt: Union[str, list[int], ProcessedPrompt],
                       params: Optional[SamplingParams], request_id: str,
                       priority: int = 0, tenant: Optional[str] = None,
                       lora_request: Optional[LoRARequest] = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (DELTA or FINAL_ONLY per `params`).

        Raises ValueError for invalid input before anything reaches the core,
        RequestFailedError if this request fails inside the engine (the others go on; a
        RequestRefusedError, also a ValueError, when the engine found the request at fault), and
        EngineDeadError if the core dies meanwhile. Leaving the iterator early aborts."""
        self._check_alive()
        if request_id in self._queues:
            raise InvalidParameter(
                "request_id", f"request_id {request_id!r} is already in use; pass a unique one.")
        if not isinstance(prompt, ProcessedPrompt):
            if params is None:
                params = self.input_processor.default_sampling_params()
            prompt = self.process(prompt, params)
        text, token_ids, params = prompt
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            core_requests = self.output_processor.add_request(
                request_id, text, token_ids, params,
                time.time(), priority, self.eos_token_id, tenant, lora_request,
            )
            for core_request in core_requests:
                await self.client.add_request_async(core_request)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Forget the request and tell the core to free it (no await: runs from `finally`)."""
        core_ids = self.output_processor.abort_request(request_id)
        if core_ids and self.is_alive:
            self.client.abort_requests_nowait(core_ids)

    @property
    def num_requests(self) -> int:
        """Requests this process is waiting on (streams and non-streaming alike)."""
        return len(self._queues)

    def fail_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (raised from its iterator, whose exit
        aborts it in the core): the last step of a server's drain."""
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def reset_prefix_cache(self) -> Any:
        return await self.client.call_utility_async("reset_prefix_cache")

    # ---- internals ----
    async def _output_loop(self) -> None:
        try:
            while True:
                tag, payload = await self.client.get_output_async()
                if tag is OutputType.REQUEST_ERROR:
                    self._fail_request(payload.request_id, ValueError(payload.message))
                    continue
                await self._handle_outputs(payload)
        except asyncio.CancelledError:
            raise
        except EngineDeadError as exc:
            self._mark_dead(str(exc))
        except Exception as exc:  # a bug here must not leave requests hanging
            logger.exception("Output loop failed")
            self._mark_dead(f"output loop failed: {exc!r}")

    async def _handle_outputs(self, outputs: Any) -> None:
        # Request metrics are wall-clock times of this process (arrival is `time.time()`
        # here); the core stamps its own clock, so restamp on receipt.
        now = time.time()
        outputs.timestamp = now
        request_outputs, to_abort = self.output_processor.process_outputs(outputs)
        if to_abort:
            await self.client.abort_requests_async(to_abort)
        if outputs.scheduler_stats is not None:
            self.latest_stats = outputs.scheduler_stats
            for observer in self.observers:
                observer.on_scheduler_stats(outputs.scheduler_stats)
        for out in request_outputs:
            for observer in self.observers:
                observer.on_request_output(out, now)
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue
            error = failure_of(out)
            # A failed completion fails its request: the caller's iterator raises (and its
            # exit aborts any sibling completions still running).
            queue.put_nowait(out if error is None else error)

    def _fail_request(self, core_request_id: str, error: BaseException) -> None:
        # n > 1 children have ids derived from the parent's; fail whichever parent owns it.
        for request_id, queue in self._queues.items():
            if core_request_id == request_id or core_request_id.endswith("_" + request_id):
                self.output_processor.abort_request(request_id)
                queue.put_nowait(error)
                return

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("Engine is dead: %s", reason)
        error = EngineDeadError(f"The engine core is not running: {reason}.")
        for queue in self._queues.values():
            queue.put_nowait(error)
        for callback in self._on_death:
            callback()

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(
                f"The engine core is not running: {self.dead_reason or 'process exited'}."
            )


def _eos_token_id(tokenizer_module: Any, model: Any, tokenizer: Any) -> Optional[int]:
    """The EOS id the core stops on (the first, when the model lists several)."""
    if hasattr(tokenizer_module, "eos_token_id"):
        return tokenizer_module.eos_token_id(model, tokenizer)
    ids = tokenizer_module.eos_token_ids(model, tokenizer)
    return ids[0] if ids else None
