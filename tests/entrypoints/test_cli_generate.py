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


def test_tokenizer_export_writes_the_servers_tokenizer(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from engine.engine_args import EngineArgs
    from engine.tokenizer import load_tokenizer

    target = tmp_path / "tok"
    out = _engine("tokenizer", "export", smollm2, str(target))
    assert "tokenizer.json" in out and (target / "tokenizer.json").is_file()
    exported = AutoTokenizer.from_pretrained(str(target))
    served = load_tokenizer(EngineArgs(model=smollm2).create_config().model)
    text = "The capital of France is Paris. <|im_start|>user\nhi"
    assert exported.encode(text) == served.encode(text) and len(exported) == len(served)
    chat = [{"role": "user", "content": "Hi"}]
    assert exported.apply_chat_template(chat, tokenize=False) == \
        served.apply_chat_template(chat, tokenize=False)
    again = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "tokenizer",
                            "export", smollm2, str(target)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1 and "not empty" in again.stdout
