"""Data parallelism: N engine cores, each its own process and executor, behind one client.

Rule: the client is the only place that knows there are several cores. A request goes to the
core with the fewest unfinished requests (ties: the lowest index) and stays there; its
aborts go to that core only. Outputs of every core come out of one `get_output`, and each
core's scheduler stats are merged before anyone sees them, so a gauge reads the whole engine
(running and waiting summed, KV-cache usage averaged) and a counter adds each core's delta
once. The transport is the single-core one (`mp_client.py`), N times; replica k is started
with `data_parallel_rank = k`, which places its workers on the devices after replica k-1's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Optional

import zmq

from engine.config import EngineConfig
from engine.engine_args import EngineArgs
from engine.engine_core.client import EngineCoreClient
from engine.engine_core.mp_client import AsyncMPClient, EngineDeadError, SyncMPClient
from engine.engine_core.transport import (
    OutputType,
    RequestType,
    UtilityCall,
    decode_output,
    encode,
)
from engine.messages.core import EngineCoreOutputs, EngineCoreRequest, SchedulerStats

logger = logging.getLogger(__name__)

_POLL_MS = 100  # how often a waiting sync client checks that every core is alive


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    """One config per data-parallel replica, each knowing its rank."""
    size = config.parallel.data_parallel_size
    return [
        dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, data_parallel_rank=rank))
        for rank in range(size)
    ]


class LoadBalancer:
    """Which core owns each unfinished request, and how many each core has."""

    def __init__(self, num_cores: int) -> None:
        self.num_unfinished = [0] * num_cores
        self.owner: dict[str, int] = {}

    def assign(self, request_id: str) -> int:
        """The least-loaded core (lowest index on ties), now owning `request_id`."""
        if request_id in self.owner:
            raise ValueError(f"request_id {request_id!r} is already running; pass a unique one.")
        core = min(range(len(self.num_unfinished)), key=lambda i: (self.num_unfinished[i], i))
        self.owner[request_id] = core
        self.num_unfinished[core] += 1
        return core

    def finish(self, request_id: str) -> Optional[int]:
        """Forget a finished (or refused, or aborted) request; its core, if it was known."""
        core = self.owner.pop(request_id, None)
        if core is not None:
            self.num_unfinished[core] -= 1
        return core

    def route_aborts(self, request_ids: Iterable[str]) -> dict[int, list[str]]:
        """Aborted requests grouped by owning core, forgotten here (a core sends nothing
        more for a request it aborted). Unknown ids (already finished) are dropped."""
        by_core: dict[int, list[str]] = {}
        for request_id in request_ids:
            core = self.finish(request_id)
            if core is not None:
                by_core.setdefault(core, []).append(request_id)
        return by_core


class StatsMerger:
    """The engine's stats from each core's latest: gauges over all cores, counters as the
    reporting core's delta (every core reports its own deltas exactly once)."""

    def __init__(self, num_cores: int) -> None:
        self.latest = [SchedulerStats() for _ in range(num_cores)]

    def merge(self, core: int, stats: SchedulerStats) -> SchedulerStats:
        self.latest[core] = stats
        return SchedulerStats(
            num_running_reqs=sum(s.num_running_reqs for s in self.latest),
            num_waiting_reqs=sum(s.num_waiting_reqs for s in self.latest),
            kv_cache_usage=sum(s.kv_cache_usage for s in self.latest) / len(self.latest),
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_generation_tokens=stats.num_generation_tokens,
            expert_load=stats.expert_load,  # a delta too: summed by whoever accumulates
        )


def combine_utility_results(results: list[Any]) -> Any:
    """One answer for a call made on every core: `all()` of booleans, the value when every
    core gave the same, else the list (core order)."""
    if all(isinstance(r, bool) for r in results):
        return all(results)
    if all(r == results[0] for r in results):
        return results[0]
    return results


class _Replicas:
    """Balancing and stats shared by the sync and async clients."""

    def __init__(self, num_cores: int) -> None:
        self.balancer = LoadBalancer(num_cores)
        self.merger = StatsMerger(num_cores)
        self.latest_stats = SchedulerStats()
        # Tokens each core reports having sampled, since the client started.
        self.num_generation_tokens = [0] * num_cores

    def absorb(self, core: int, outputs: EngineCoreOutputs) -> EngineCoreOutputs:
        """Book finished requests, replace the core's stats with the merged ones."""
        for out in outputs.outputs:
            if out.finished:
                self.balancer.finish(out.request_id)
        if outputs.scheduler_stats is not None:
            self.num_generation_tokens[core] += outputs.scheduler_stats.num_generation_tokens
            outputs.scheduler_stats = self.merger.merge(core, outputs.scheduler_stats)
            self.latest_stats = outputs.scheduler_stats
        return outputs


def _start_all(make: Callable[[EngineConfig], Any], config: EngineConfig) -> list[Any]:
    """Start every replica's core process (they load in parallel)."""
    clients: list[Any] = []
    try:
        for replica in replica_configs(config):
            clients.append(make(replica))
    except BaseException:
        for client in clients:
            client.shutdown()
        raise
    return clients


def _wait_all(clients: list[Any], timeout_s: Optional[float]) -> dict[str, float]:
    """Wait until every core is ready; startup timings of the slowest core per step."""
    timings: dict[str, float] = {}
    for rank, client in enumerate(clients):
        try:
            for name, seconds in client.wait_until_ready(timeout_s).items():
                timings[name] = max(seconds, timings.get(name, 0.0))
        except RuntimeError as exc:
            raise RuntimeError(f"data-parallel rank {rank}: {exc}") from exc
    return timings


class DPSyncClient(EngineCoreClient):
    """Blocking client over `data_parallel_size` core processes (for `LLM`)."""

    def __init__(self, config: EngineConfig, log_level: str = "warning") -> None:
        self.clients: list[SyncMPClient] = _start_all(
            lambda c: SyncMPClient(c, log_level=log_level), config)
        self.replicas = _Replicas(len(self.clients))
        self._backlog: deque[tuple[int, OutputType, Any]] = deque()
        self._call_ids = itertools.count()
        self._poller = zmq.Poller()
        for client in self.clients:
            self._poller.register(client.output_socket, zmq.POLLIN)

    def wait_until_ready(self, timeout_s: Optional[float] = None) -> dict[str, float]:
        try:
            return _wait_all(self.clients, timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def latest_stats(self) -> SchedulerStats:
        return self.replicas.latest_stats

    @property
    def num_unfinished(self) -> list[int]:
        """Unfinished requests per core, as balanced."""
        return list(self.replicas.balancer.num_unfinished)

    def add_request(self, request: EngineCoreRequest) -> None:
        core = self.replicas.balancer.assign(request.request_id)
        self.clients[core].add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for core, ids in self.replicas.balancer.route_aborts(request_ids).items():
            self.clients[core].abort_requests(ids)

    def get_output(self) -> EngineCoreOutputs:
        """The next outputs of any core (stats merged)."""
        while True:
            core, tag, payload = self._backlog.popleft() if self._backlog else self._recv_any()
            if tag is OutputType.OUTPUTS:
                return self.replicas.absorb(core, payload)
            if tag is OutputType.REQUEST_ERROR:
                self.replicas.balancer.finish(payload.request_id)
                raise ValueError(payload.message)

    def call_utility(self, method: str, *args: Any) -> Any:
        """Run an allow-listed core method on every core; see `combine_utility_results`."""
        results = []
        for core, client in enumerate(self.clients):
            call_id = next(self._call_ids)
            client.input_socket.send_multipart(
                encode(RequestType.UTILITY, UtilityCall(call_id, method, list(args))))
            while True:
                tag, payload = self._recv(core)
                if tag is OutputType.UTILITY_RESULT and payload.call_id == call_id:
                    if payload.error is not None:
                        raise RuntimeError(f"Engine core utility call failed on data-parallel "
                                           f"rank {core}: {payload.error}")
                    results.append(payload.result)
                    break
                if tag is not OutputType.UTILITY_RESULT:
                    self._backlog.append((core, tag, payload))  # keep it for get_output
        return combine_utility_results(results)

    def _recv_any(self) -> tuple[int, OutputType, Any]:
        while True:
            ready = dict(self._poller.poll(_POLL_MS))
            for core, client in enumerate(self.clients):
                if client.output_socket in ready:
                    return (core, *self._recv(core))
            self._check_alive()

    def _recv(self, core: int) -> tuple[OutputType, Any]:
        client = self.clients[core]
        while not client.output_socket.poll(_POLL_MS):
            self._check_alive()
        tag, payload = decode_output(client.output_socket.recv_multipart())
        if tag is OutputType.ERROR:
            raise EngineDeadError(f"Engine core of data-parallel rank {core} failed:\n{payload}")
        return tag, payload

    def _check_alive(self) -> None:
        for core, client in enumerate(self.clients):
            if not client.is_alive:
                raise EngineDeadError(f"Engine core of data-parallel rank {core} exited (code "
                                      f"{client.handle.process.exitcode}).")

    def shutdown(self) -> None:
        for client in self.clients:
            client.shutdown()


class DPAsyncClient:
    """asyncio client over `data_parallel_size` core processes (for `AsyncLLM`); the same
    methods as `AsyncMPClient`."""

    def __init__(self, config: EngineConfig, log_level: str = "info") -> None:
        self.clients: list[AsyncMPClient] = _start_all(
            lambda c: AsyncMPClient(c, log_level=log_level), config)
        self.replicas = _Replicas(len(self.clients))
        self._reads: dict[int, asyncio.Future] = {}
        self._next = 0  # the core served first when several have outputs (round robin)
        self._dead: Optional[str] = None

    def wait_until_ready(self, timeout_s: Optional[float] = None) -> dict[str, float]:
        return _wait_all(self.clients, timeout_s)

    @property
    def is_alive(self) -> bool:
        return all(client.is_alive for client in self.clients)

    @property
    def pid(self) -> Optional[int]:
        return self.clients[0].pid

    @property
    def pids(self) -> list[Optional[int]]:
        return [client.pid for client in self.clients]

    @property
    def num_unfinished(self) -> list[int]:
        return list(self.replicas.balancer.num_unfinished)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        core = self.replicas.balancer.assign(request.request_id)
        try:
            await self.clients[core].add_request_async(request)
        except BaseException:
            self.replicas.balancer.finish(request.request_id)
            raise

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for core, ids in self.replicas.balancer.route_aborts(request_ids).items():
            await self.clients[core].abort_requests_async(ids)

    def abort_requests_nowait(self, request_ids: list[str]) -> None:
        for core, ids in self.replicas.balancer.route_aborts(request_ids).items():
            self.clients[core].abort_requests_nowait(ids)

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        results = await asyncio.gather(*(c.call_utility_async(method, *args)
                                         for c in self.clients))
        return combine_utility_results(list(results))

    async def get_output_async(self) -> tuple[OutputType, Any]:
        """The next OUTPUTS (stats merged) or REQUEST_ERROR of any core."""
        for core, client in enumerate(self.clients):
            if core not in self._reads:
                self._reads[core] = asyncio.ensure_future(client.get_output_async())
        await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        order = [(self._next + k) % len(self.clients) for k in range(len(self.clients))]
        core = next(c for c in order if self._reads[c].done())
        self._next = (core + 1) % len(self.clients)
        read = self._reads.pop(core)
        try:
            tag, payload = read.result()
        except EngineDeadError as exc:
            raise EngineDeadError(f"data-parallel rank {core}: {exc}") from exc
        if tag is OutputType.OUTPUTS:
            payload = self.replicas.absorb(core, payload)
        elif tag is OutputType.REQUEST_ERROR:
            self.replicas.balancer.finish(payload.request_id)
        return tag, payload

    def watch_death(self, on_death: Callable[[], None]) -> None:
        """Call `on_death()` once, as soon as any core process exits."""

        def _one_died(core: int) -> None:
            if self._dead is not None:
                return
            code = self.clients[core].handle.process.exitcode
            self._dead = (f"the engine core process of data-parallel rank {core} exited "
                          f"(code {code})")
            on_death()

        for core, client in enumerate(self.clients):
            client.watch_death(lambda core=core: _one_died(core))

    def death_reason(self) -> str:
        return self._dead or "an engine core process exited"

    def shutdown(self) -> None:
        for read in self._reads.values():
            read.cancel()
        self._reads.clear()
        for client in self.clients:
            client.shutdown()


def make_async_client(engine_args: EngineArgs, log_level: str) -> Any:
    """`AsyncMPClient` for one core (it resolves the config itself, in parallel with the
    server), `DPAsyncClient` for `data_parallel_size > 1` (the config is resolved here once,
    then each replica gets its rank)."""
    if engine_args.data_parallel_size > 1:
        return DPAsyncClient(engine_args.create_config(), log_level=log_level)
    return AsyncMPClient(engine_args, log_level=log_level)
