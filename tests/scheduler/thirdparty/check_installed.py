"""Run inside the environment where engine-demo-scheduler was pip-installed: the policy is
found through the entry point and orders a real engine's requests (SmolLM2, one at a time:
shortest prompt first)."""

import importlib.metadata
import json
import sys

from engine import LLM, SamplingParams


def main(model: str) -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="engine.schedulers")}
    assert eps["shortest_prompt"].dist.name == "engine-demo-scheduler", eps["shortest_prompt"]
    llm = LLM(model=model, scheduling_policy="shortest_prompt", max_num_seqs=1,
              kv_cache_memory="64m", max_model_len=256)
    assert type(llm.core.scheduler.waiting).__name__ == "ShortestPromptFirst"
    prompts = ["word " * n for n in (40, 5, 20, 1, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    order = sorted(range(len(outs)), key=lambda i: outs[i].metrics.first_scheduled_time)
    print(json.dumps({"order": order}))


if __name__ == "__main__":
    main(sys.argv[1])
