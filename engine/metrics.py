"""Prometheus metrics of a serving engine, in the names users already scrape (`engine:*`).

Rule: every metric lives in a registry owned by one app (several servers can share a test
process), is fed only from the output loop (scheduler stats and request outputs), and
counters take the per-step deltas the core reports, so nothing is counted twice.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.messages.core import SchedulerStats
from engine.outputs.request_output import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                    40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class EngineMetrics:
    """All `engine:*` metrics of one server, labelled with its model name."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets,
                             registry=registry).labels(model_name)

        self.model_name = model_name
        self.num_running = gauge("engine:num_requests_running", "Requests in the running set.")
        self.num_waiting = gauge("engine:num_requests_waiting", "Requests waiting to run.")
        self.kv_cache_usage = gauge("engine:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks in use (1 = full).")
        self.prompt_tokens = counter("engine:prompt_tokens_total", "Prompt tokens computed.")
        self.generation_tokens = counter("engine:generation_tokens_total",
                                         "Tokens generated.")
        self.preemptions = counter("engine:num_preemptions_total", "Requests preempted.")
        self.prefix_queries = counter("engine:prefix_cache_queries_total",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("engine:prefix_cache_hits_total",
                                   "Prompt tokens found in the prefix cache.")
        self._expert_tokens = Counter(
            "engine:moe_expert_tokens_total",
            "Token-slots routed to each expert, summed over the MoE layers (expert "
            "parallelism only).", labels + ["expert"], registry=registry)
        self._success = Counter("engine:request_success_total", "Finished requests by reason.",
                                labels + ["finished_reason"], registry=registry)
        self.ttft = histogram("engine:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("engine:inter_token_latency_seconds",
                             "Time between two generated tokens of a request.", _LATENCY_BUCKETS)
        self.e2e = histogram("engine:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", _REQUEST_BUCKETS)
        self.queue_time = histogram("engine:request_queue_time_seconds",
                                    "Time from arrival to first being scheduled.",
                                    _REQUEST_BUCKETS)
        # request id -> wall time of its last token seen, for inter-token latency.
        self._last_token_time: dict[str, Optional[float]] = {}

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running_reqs)
        self.num_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.preemptions.inc(stats.num_preemptions)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        for expert, num_tokens in enumerate(stats.expert_load or ()):
            self._expert_tokens.labels(self.model_name, str(expert)).inc(num_tokens)

    def on_request_output(self, output: RequestOutput, now: float) -> None:
        metrics = output.metrics
        arrival = metrics.arrival_time if metrics is not None else now
        num_new = sum(len(c.token_ids) for c in output.outputs)
        last = self._last_token_time.get(output.request_id)
        if output.finished and last is None and metrics is not None:
            self._observe_whole(metrics)  # FINAL_ONLY: the one output holds all tokens
        elif num_new:
            if last is None:
                first = metrics.first_token_time if metrics and metrics.first_token_time else now
                self.ttft.observe(max(0.0, first - arrival))
            else:
                per_token = (now - last) / num_new
                for _ in range(num_new):
                    self.itl.observe(per_token)
            self._last_token_time[output.request_id] = now
        if not output.finished:
            return
        self._last_token_time.pop(output.request_id, None)
        finished = metrics.finished_time if metrics and metrics.finished_time else now
        self.e2e.observe(max(0.0, finished - arrival))
        if metrics is not None and metrics.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, metrics.first_scheduled_time - arrival))
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            self._success.labels(self.model_name, reason).inc()

    def _observe_whole(self, metrics) -> None:
        if metrics.first_token_time is None:
            return
        self.ttft.observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
        if metrics.last_token_time is not None and metrics.num_generation_tokens > 1:
            gap = metrics.last_token_time - metrics.first_token_time
            per_token = gap / (metrics.num_generation_tokens - 1)
            for _ in range(metrics.num_generation_tokens - 1):
                self.itl.observe(per_token)
