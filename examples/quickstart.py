"""Quickstart: real text from SmolLM2-135M-Instruct on the CPU, through our own engine."""

import subprocess
import sys
import time

from engine import LLM, SamplingParams

model = subprocess.check_output([sys.executable, "scripts/smollm2_path.py"], text=True).strip()

t0 = time.perf_counter()
llm = LLM(model=model)
print(f"LLM ready in {time.perf_counter() - t0:.1f} s")

outs = llm.generate(
    ["Hello, my name is", "The capital of France is"],
    SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=0),
)
for out in outs:
    print(f"{out.prompt!r} -> {out.outputs[0].text!r}")

reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                 SamplingParams(temperature=0.0, max_tokens=64))
print("chat ->", repr(reply[0].outputs[0].text))
