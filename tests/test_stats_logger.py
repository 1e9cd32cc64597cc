"""The periodic stats line: one line per interval while there is work, none when idle."""

import logging

import pytest

from engine.messages.core import SchedulerStats
from engine.stats_logger import StatsLogger


def test_logs_one_line_per_interval_while_busy_and_nothing_when_idle(caplog):
    now = [0.0]
    stats_logger = StatsLogger(interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="engine.stats")
    now[0] = 5.0
    stats_logger.on_scheduler_stats(SchedulerStats(
        num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25, prefix_cache_queries=100,
        prefix_cache_hits=50, num_prompt_tokens=100, num_generation_tokens=10))
    assert not caplog.records  # interval not reached yet
    now[0] = 10.0
    stats_logger.on_scheduler_stats(SchedulerStats(num_running_reqs=2, num_waiting_reqs=1,
                                                   kv_cache_usage=0.25,
                                                   num_generation_tokens=10))
    [record] = caplog.records
    text = record.getMessage()
    assert "Avg prompt throughput: 10.0 tokens/s" in text
    assert "Avg generation throughput: 2.0 tokens/s" in text
    assert "Running: 2 reqs, Waiting: 1 reqs" in text
    assert "KV cache usage: 25.0%" in text and "Prefix cache hit rate: 50.0%" in text
    now[0] = 30.0  # idle: no running, waiting or tokens -> no line
    stats_logger.on_scheduler_stats(SchedulerStats())
    assert len(caplog.records) == 1


def test_the_line_gives_the_busiest_expert_over_the_mean_when_counted():
    stats_logger = StatsLogger(interval_s=10.0, clock=lambda: 0.0)
    stats_logger.on_scheduler_stats(SchedulerStats(num_running_reqs=1))
    assert "Expert load" not in stats_logger.line(1.0)  # a dense model: nothing counted
    stats_logger.on_scheduler_stats(SchedulerStats(num_running_reqs=1, expert_load=[1, 3]))
    stats_logger.on_scheduler_stats(SchedulerStats(num_running_reqs=1, expert_load=[1, 1]))
    assert stats_logger.line(1.0).endswith(", Expert load max/mean: 1.33")  # 4 over 3


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        StatsLogger(interval_s=0)


def test_serve_accepts_model_option_and_refuses_no_model(capsys):
    from engine.entrypoints.cli import build_parser
    from engine.entrypoints.serve_cmd import run

    args = build_parser().parse_args(["serve", "--model", "m.gguf"])
    assert args.model is None and args.model_option == "m.gguf"
    args = build_parser().parse_args(["serve"])
    assert run(args) == 2
    assert "no model" in capsys.readouterr().err
