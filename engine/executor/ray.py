"""One Ray actor per device, on one host or many: the `ray` executor.

Rule: Ray only places and runs the ranks; the rank itself is the same `Worker` the `mp`
executor runs (same groups over the platform's communicator, same model runner). A
placement group reserves one bundle per rank before any actor starts, so an engine either
gets all its devices or fails with what was missing. Every call goes to every actor in the
same order and the output rank's answer is the result; while waiting, the executor
watches all the calls at once, so an actor that dies fails the engine within seconds with
its rank and node instead of leaving its peers blocked in a collective. An actor runs its
calls in the order they were made, so pipeline stages take the next batch as soon as they
hand the last one on: the core keeps one batch per stage in flight, as with `mp`.

Ranks are assigned after placement, sorted by node (the node of bundle 0 first), so
tensor-parallel peers (neighbouring ranks) share a host whenever the cluster allows it.
The rendezvous address is the rank 0 actor's node and a port free there.

Ray is optional (`pip install 'engine[ray]'`); this module imports it only when an engine
asks for `--distributed-executor-backend ray`. Which cluster: the one this process already
joined (`ray.init()` before `LLM(...)`); else `RAY_ADDRESS` (what `engine serve` on a
multi-host cluster uses: the core runs in its own process); else one started on this host
with `ray start`; else a new local Ray instance, stopped again on shutdown. Actors and the
placement group belong to the engine-core process: if it dies, Ray removes them too.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Optional

from engine.config import EngineConfig
from engine.executor.abstract import RankedExecutor
from platforms.interface import Platform

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a waiting executor looks at every pending call
# Seconds to wait for the cluster to grant every bundle (Ray queues a placement group that
# does not fit, forever by default); ENGINE_RAY_PLACEMENT_TIMEOUT_S overrides it.
_PLACEMENT_TIMEOUT_S = 60.0
# Clusters that register their devices under another name than the platform's
# `capabilities.ray_device_resource` set this (e.g. to a custom resource).
_RESOURCE_ENV = "ENGINE_RAY_DEVICE_RESOURCE"
_SHUTDOWN_GRACE_S = 5.0
# After one rank raises, how long to wait for a peer's death to explain it.
_PEER_DEATH_WAIT_S = 2.0


def import_ray() -> Any:
    """The `ray` module, or an error saying how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "--distributed-executor-backend ray needs Ray: pip install 'engine[ray]' (or "
            "'ray'), or use --distributed-executor-backend mp on one host."
        ) from exc
    return ray


def device_resource(platform: Platform) -> Optional[str]:
    """The Ray resource one rank reserves (the platform's, or ENGINE_RAY_DEVICE_RESOURCE);
    None: the device is the host and a rank takes one CPU."""
    return os.environ.get(_RESOURCE_ENV) or platform.capabilities.ray_device_resource


def rank_bundle(platform: Platform) -> dict[str, float]:
    """What one rank reserves: one of its device resource, or a CPU."""
    resource = device_resource(platform)
    return {"CPU": 1.0} if resource is None else {resource: 1.0}


class RankActor:
    """Hosts one rank's `Worker` inside a Ray actor process (wrapped by `ray.remote`)."""

    def __init__(self) -> None:
        self.worker: Any = None

    def where(self) -> tuple[str, int]:
        """(node IP, pid) of this actor."""
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def rendezvous_address(self) -> str:
        """A TCP address on this actor's node for the world's rendezvous (asked of rank 0)."""
        from engine.distributed import free_port

        ip, _ = self.where()
        return f"tcp://{ip}:{free_port(ip)}"

    def start(self, config: EngineConfig, platform_name: str, rank: int, init_method: str,
              ranks_on_node: int, reserved_device: bool) -> None:
        """Build the rank's groups and model runner (blocks until every rank has joined)."""
        import torch

        from engine.worker.worker import Worker
        from platforms.registry import select_platform

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_node))
        # Ray makes only the device it granted visible to this actor: device 0 here.
        local_rank = 0 if reserved_device else rank
        self.worker = Worker(config, select_platform(platform_name), rank, init_method,
                             local_rank=local_rank)

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        from engine.worker.worker import WORKER_METHODS

        if method not in WORKER_METHODS:
            raise ValueError(f"Unknown worker method {method!r}.")
        return getattr(self.worker, method)(*args)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


class RayExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        ray = self._ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._set_layout(config)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # RAY_ADDRESS, else a running local cluster, else a new local instance. A local
            # instance we start runs its workers at normal priority: they are the workload,
            # and Ray's default (nice 15) starves them on a busy host.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
        self._failure: Optional[str] = None
        self.actors: list[Any] = []
        self.placement: list[tuple[str, int]] = []  # (node IP, pid) of each rank
        bundle = rank_bundle(platform)
        self._pg = self._reserve(bundle)
        try:
            remote_cls = ray.remote(RankActor)
            options = _actor_options(device_resource(platform))
            unordered = [
                remote_cls.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._pg, placement_group_bundle_index=index),
                    **options,
                ).remote()
                for index in range(self.world_size)
            ]
            self.actors = unordered  # so a failure below still kills them
            where = self._gather([a.where.remote() for a in unordered], "placement")
            order = _rank_order([ip for ip, _ in where])
            self.actors = [unordered[i] for i in order]
            self.placement = [where[i] for i in order]
            init_method = self._gather([self.actors[0].rendezvous_address.remote()],
                                       "rendezvous")[0]
            per_node = Counter(ip for ip, _ in self.placement)
            self._gather([
                actor.start.remote(config, platform.name, rank, init_method,
                                   per_node[self.placement[rank][0]],
                                   device_resource(platform) is not None)
                for rank, actor in enumerate(self.actors)
            ], "start")
        except BaseException:
            self.shutdown()
            raise
        logger.info("ray executor: %d ranks on %s, rendezvous %s", self.world_size,
                    [f"{ip} pid {pid}" for ip, pid in self.placement], init_method)

    def _reserve(self, bundle: dict[str, float]) -> Any:
        """A placement group of one bundle per rank, granted within the timeout."""
        from ray.util.placement_group import placement_group, remove_placement_group

        ray = self._ray
        timeout_s = float(os.environ.get("ENGINE_RAY_PLACEMENT_TIMEOUT_S", _PLACEMENT_TIMEOUT_S))
        pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            if self._owns_ray:
                ray.shutdown()
            raise RuntimeError(
                f"The Ray cluster did not grant {self.world_size} bundles of {bundle} within "
                f"{timeout_s:g} s (tensor_parallel_size x pipeline_parallel_size "
                f"= {self.world_size}); the cluster has {ray.cluster_resources()} in all and "
                f"{ray.available_resources()} free. Add nodes or devices, lower the parallel "
                "sizes, or raise ENGINE_RAY_PLACEMENT_TIMEOUT_S."
            )
        return pg

    # ---- calls ----
    def _submit(self, method: str, *args: Any) -> list[Any]:
        """Queue `method(*args)` on every actor (an actor runs its calls in the order they
        were made); the calls' object refs."""
        self._raise_if_failed()
        args_ref = self._ray.put(args)  # serialized once, read by every actor
        return [a.call.remote(method, args_ref) for a in self.actors]

    def _collect(self, method: str, submitted: list[Any]) -> list[Any]:
        return self._gather(submitted, method)

    def _gather(self, refs: list[Any], method: str) -> list[Any]:
        """Every result, failing as soon as any call fails (a dead actor's call fails at
        once, while its peers may be blocked in a collective waiting for it)."""
        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
            for ref in ready:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._fail(self._death(i, method, exc))
                except ray.exceptions.RayTaskError as exc:
                    # A peer's death explains a collective's error: report the death.
                    died = self._death_among(pending, index, method)
                    self._fail(died or f"worker rank {i}{self._place(i)} raised in "
                                       f"{method}:\n{exc}")
        return results

    def _death(self, rank: int, method: str, exc: BaseException) -> str:
        return (f"worker rank {rank}{self._place(rank)} died during {method}; the engine "
                "cannot continue with a rank missing. Restart it; check the actor's log and "
                "the node's memory (an out-of-memory kill is SIGKILL). Ray says: "
                f"{_first_line(exc)}")

    def _death_among(self, pending: list[Any], index: dict[Any, int],
                     method: str) -> Optional[str]:
        """The death report of a rank among `pending` calls that fails within a grace
        period, if any."""
        ray = self._ray
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=_PEER_DEATH_WAIT_S)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                return self._death(index[ref], method, exc)
            except ray.exceptions.RayTaskError:
                continue
        return None

    def _place(self, rank: int) -> str:
        if rank < len(self.placement):
            ip, pid = self.placement[rank]
            return f" (node {ip}, pid {pid})"
        return ""

    def shutdown(self) -> None:
        """Let live ranks destroy their groups, then kill every actor and free the bundles."""
        ray = getattr(self, "_ray", None)
        if ray is None or not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        actors, self.actors = self.actors, []
        if actors and self._failure is None:
            refs = [a.shutdown.remote() for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=_SHUTDOWN_GRACE_S)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            remove_placement_group(pg)
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def _actor_options(resource: Optional[str]) -> dict[str, Any]:
    """An actor's own resources: exactly its bundle (a device rank takes no CPU). Ray
    takes GPUs through `num_gpus` only, every other resource through `resources`."""
    if resource is None:
        return {"num_cpus": 1.0}
    if resource == "GPU":
        return {"num_cpus": 0.0, "num_gpus": 1.0}
    return {"num_cpus": 0.0, "resources": {resource: 1.0}}


def _rank_order(node_ips: list[str]) -> list[int]:
    """Bundle indices in rank order: grouped by node, the first bundle's node first, so
    neighbouring ranks (tensor-parallel peers) share a node when they can."""
    first_seen = {ip: n for n, ip in reversed(list(enumerate(node_ips)))}
    return sorted(range(len(node_ips)), key=lambda i: (first_seen[node_ips[i]], i))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
