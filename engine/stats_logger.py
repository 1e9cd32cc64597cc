"""A periodic one-line stats log of a serving engine (`engine serve`, off with
`--disable-log-stats`).

Rule: fed only from the output loop like the Prometheus metrics; it accumulates the per-step
deltas the core reports and writes at most one line per interval, and only while there is
work (requests running or waiting, or tokens computed since the last line), so an idle
server stays quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Optional

from engine.messages.core import SchedulerStats
from engine.outputs.request_output import RequestOutput

logger = logging.getLogger("engine.stats")


class StatsLogger:
    """Logs prompt and generation throughput, running / waiting, KV usage and the
    prefix-cache hit rate every `interval_s` seconds while requests run."""

    def __init__(self, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}.")
        self.interval_s = interval_s
        self._clock = clock
        self._last_log = clock()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._latest: Optional[SchedulerStats] = None
        self._expert_load: Optional[list[int]] = None  # since the last line (EP MoE only)

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self._latest = stats
        if stats.expert_load is not None:
            self._expert_load = stats.expert_load if self._expert_load is None else [
                a + b for a, b in zip(self._expert_load, stats.expert_load, strict=True)]
        self._prompt_tokens += stats.num_prompt_tokens
        self._generation_tokens += stats.num_generation_tokens
        self._prefix_queries += stats.prefix_cache_queries
        self._prefix_hits += stats.prefix_cache_hits
        now = self._clock()
        if now - self._last_log >= self.interval_s:
            self._log(now)

    def on_request_output(self, output: RequestOutput, now: float) -> None:
        return None

    def line(self, elapsed_s: float) -> Optional[str]:
        """The stats line for the last `elapsed_s` seconds; None when there was no work."""
        stats = self._latest or SchedulerStats()
        busy = stats.num_running_reqs or stats.num_waiting_reqs
        if not (busy or self._prompt_tokens or self._generation_tokens):
            return None
        elapsed_s = max(elapsed_s, 1e-9)
        hit_rate = self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0
        return (f"Avg prompt throughput: {self._prompt_tokens / elapsed_s:.1f} tokens/s, "
                f"Avg generation throughput: {self._generation_tokens / elapsed_s:.1f} "
                f"tokens/s, Running: {stats.num_running_reqs} reqs, "
                f"Waiting: {stats.num_waiting_reqs} reqs, "
                f"KV cache usage: {stats.kv_cache_usage * 100:.1f}%, "
                f"Prefix cache hit rate: {hit_rate * 100:.1f}%{self._expert_balance()}")

    def _expert_balance(self) -> str:
        """", Expert load max/mean: 1.42" (the busiest expert over the mean) when counted."""
        load = self._expert_load
        if not load or not sum(load):
            return ""
        return f", Expert load max/mean: {max(load) * len(load) / sum(load):.2f}"

    def _log(self, now: float) -> None:
        text = self.line(now - self._last_log)
        if text is not None:
            logger.info(text)
        self._last_log = now
        self._prompt_tokens = self._generation_tokens = 0
        self._prefix_queries = self._prefix_hits = 0
        self._expert_load = None
