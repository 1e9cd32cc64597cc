"""`LLM.start_profile(dir)` / `stop_profile()`: every rank writes its own trace and op table,
in this process (uniproc) and in mp worker processes (TP=2)."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from engine import LLM, SamplingParams


@pytest.mark.parametrize("tp", [1, 2])
def test_every_rank_writes_a_trace_and_a_table(tiny_llama_kv1, tmp_path, tp):
    llm = LLM(tiny_llama_kv1, tensor_parallel_size=tp, num_kv_blocks=32, max_model_len=128,
              max_num_seqs=4)
    try:
        with pytest.raises(RuntimeError, match="start_profile"):
            llm.stop_profile()
        llm.start_profile(str(tmp_path))
        with pytest.raises(Exception, match="already being recorded"):
            llm.start_profile(str(tmp_path))
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
        files = llm.stop_profile()
    finally:
        llm.shutdown()
    expected = {f"rank{r}.{ext}" for r in range(tp) for ext in ("json.gz", "txt")}
    assert {os.path.basename(f) for f in files} == expected
    for rank in range(tp):
        with gzip.open(tmp_path / f"rank{rank}.json.gz", "rt") as f:
            names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
        assert any(n.startswith("aten::") for n in names)  # the forward's ops are in it
        assert "aten::" in (tmp_path / f"rank{rank}.txt").read_text()
