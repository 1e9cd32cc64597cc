"""`engine generate` and `engine chat --message` print real text from SmolLM2."""

from __future__ import annotations

import subprocess
import sys


def _engine(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_generate_prints_each_prompt_with_its_completion(smollm2):
    out = _engine("generate", smollm2, "--prompt", "The capital of France is",
                  "--prompt", "1, 2, 3,", "--max-tokens", "8", "--kv-cache-memory", "256m")
    assert "'The capital of France is' ->" in out and "Paris" in out
    assert "'1, 2, 3,' ->" in out


def test_chat_answers_one_message(smollm2):
    out = _engine("chat", smollm2, "--message", "What is the capital of France?",
                  "--max-tokens", "16", "--kv-cache-memory", "256m")
    assert "Paris" in out
