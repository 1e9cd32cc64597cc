"""Run inside the environment where engine-demo-accel was pip-installed: discovery, forced
selection, the whole conformance kit, and greedy text equal to the CPU platform's."""

import importlib.metadata
import json
import os
import sys

from platforms import registry
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_communicator,
    check_contract,
    check_device,
    check_events,
    check_graph_runner,
    check_kernel_overrides,
    check_memory_info,
)


def main() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="engine.plugins")}
    assert eps["demo_accel"].dist.name == "engine-demo-accel", eps["demo_accel"].dist
    infos = {i.name: i for i in registry.discover()}
    info = infos["demo_accel"]
    assert info.distribution == "engine-demo-accel" and info.available and info.problem is None
    choice = registry.choose_platform()
    assert choice.platform.name == "demo_accel", choice.reason  # priority 3 beats cpu's 0
    forced = registry.choose_platform("cpu")
    assert forced.platform.name == "cpu" and "forced" in forced.reason

    platform = registry.select_platform("demo_accel")
    from engine_demo_accel.platform import DemoAccelPlatform

    for case in ATTENTION_CASES:
        check_attention_against_reference(platform, case)
    check_device(platform)
    check_memory_info(platform)
    check_events(platform)
    check_kernel_overrides(platform)
    check_contract(platform)
    err = check_graph_runner(platform)
    check_communicator(DemoAccelPlatform, world_size=2)

    from engine import LLM, SamplingParams

    model = sys.argv[1]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    texts = {}
    for device in ("demo_accel", "cpu"):
        llm = LLM(model=model, device=device, kv_cache_memory="256m")
        texts[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert texts["demo_accel"] == texts["cpu"], texts
    print(json.dumps({"ok": True, "graph_err": err, "tokens": texts["cpu"][0][:4],
                      "env": os.environ.get("VIRTUAL_ENV")}))


if __name__ == "__main__":  # the communicator check spawns processes that import this file
    main()
