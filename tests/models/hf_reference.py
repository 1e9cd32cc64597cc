"""HF transformers as the reference for model tests: greedy continuations and their
logprobs, token by token over the whole sequence (no HF cache, so no cache semantics of
HF's own leak into the reference)."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """HF's greedy continuation of `prompt` and each chosen token's logprob (float32)."""
    ids, tokens, logprobs = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf_model(ids).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs
