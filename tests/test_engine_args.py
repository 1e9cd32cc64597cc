"""Engine option names: vLLM's, plus the short names users reach for."""

from __future__ import annotations

import argparse

import pytest

from engine.engine_args import EngineArgs
from engine.entrypoints.args import add_engine_args, engine_args_from_namespace


def _parse(*flags: str) -> EngineArgs:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_engine_args(parser)
    return engine_args_from_namespace(parser.parse_args(["m", *flags]))


@pytest.mark.parametrize("flags", [("--scheduling-policy", "fair"), ("--scheduler", "fair")])
def test_the_scheduling_policy_has_vllms_name_and_a_short_one(flags):
    assert _parse(*flags).scheduling_policy == "fair"
    assert _parse().scheduling_policy == "fcfs"


def test_llm_keyword_scheduler_is_the_same_option():
    assert EngineArgs(model="m", scheduler="priority").scheduling_policy == "priority"
    assert EngineArgs(model="m", scheduling_policy="fair").scheduling_policy == "fair"
    with pytest.raises(ValueError, match="schedulr"):
        EngineArgs(model="m", schedulr="fair")  # a misspelling is an error, not ignored
