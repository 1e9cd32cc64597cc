"""The torch references of the MoE ops equal a naive per-token loop, and HF's routers and
expert loops (Mixtral, Qwen2-MoE, Qwen3-MoE) on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from platforms.kernels import (
    MoERouting,
    fused_experts,
    fused_moe,
    moe_select_experts,
)


def _naive_select(logits, routing, bias=None):
    """One token at a time, written straight from the docstring."""
    weights, ids = [], []
    for row in logits.float():
        scores = row.softmax(-1) if routing.scoring == "softmax" else row.sigmoid()
        choice = scores if bias is None else scores + bias
        allowed = list(range(len(row)))
        if routing.num_expert_group is not None:
            size = len(row) // routing.num_expert_group
            groups = [choice[g * size:(g + 1) * size] for g in range(routing.num_expert_group)]
            gscore = torch.stack([g.max() if bias is None else g.topk(2).values.sum()
                                  for g in groups])
            top = gscore.topk(routing.topk_group).indices.tolist()
            allowed = [e for e in allowed if e // size in top]
        masked = torch.full_like(choice, float("-inf"))
        masked[allowed] = choice[allowed]
        idx = masked.topk(routing.top_k).indices
        w = scores[idx]
        if routing.renormalize:
            w = w / w.sum()
        weights.append(w * routing.routed_scaling_factor)
        ids.append(idx)
    return torch.stack(weights), torch.stack(ids).int()


def _naive_experts(hidden, w13, w2, weights, ids):
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(hidden.shape[0]):
        h = hidden[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gate, up = w13[e, :inter].double() @ h, w13[e, inter:].double() @ h
            out[t] += float(weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


ROUTINGS = [
    (16, MoERouting(top_k=2, renormalize=True), False),
    (16, MoERouting(top_k=4, renormalize=False), False),
    (16, MoERouting(top_k=3, scoring="sigmoid", renormalize=True), False),
    (16, MoERouting(top_k=3, scoring="sigmoid", renormalize=True), True),
    (32, MoERouting(top_k=4, renormalize=True, num_expert_group=4, topk_group=2), False),
    (32, MoERouting(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=8,
                    topk_group=3, routed_scaling_factor=2.5), True),
]


@pytest.mark.parametrize("experts,routing,with_bias", ROUTINGS)
def test_select_experts_equals_a_per_token_loop(experts, routing, with_bias):
    gen = torch.Generator().manual_seed(experts + routing.top_k)
    logits = torch.randn(23, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.3 if with_bias else None
    weights, ids = moe_select_experts(logits, routing, bias)
    want_w, want_ids = _naive_select(logits, routing, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)
    if routing.num_expert_group is not None:  # every choice lies in an allowed group
        size = experts // routing.num_expert_group
        assert all(len(set((row // size).tolist())) <= routing.topk_group for row in ids)


def test_select_experts_takes_bf16_logits_and_computes_in_float32():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    weights, ids = moe_select_experts(logits, MoERouting(top_k=2, renormalize=True))
    want_w, want_ids = _naive_select(logits.float(), MoERouting(top_k=2, renormalize=True))
    assert weights.dtype == torch.float32
    assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w)


def _weights(experts, hidden, inter, gen, dtype=torch.float32):
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return w13, w2


def test_fused_experts_equals_a_per_token_loop_with_idle_and_foreign_experts():
    gen = torch.Generator().manual_seed(3)
    tokens, hidden, inter, experts, k = 9, 32, 16, 12, 3
    w13, w2 = _weights(experts, hidden, inter, gen)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, 6, (tokens, k), generator=gen, dtype=torch.int32)  # 6..11 idle
    ids[0, 0], ids[2, 1], ids[4, 2] = -1, experts, -1  # not this rank's: add nothing
    weights = torch.rand(tokens, k, generator=gen)
    got = fused_experts(x, w13, w2, weights, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive_experts(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_fused_experts_with_no_token_for_this_rank():
    gen = torch.Generator().manual_seed(4)
    w13, w2 = _weights(4, 16, 8, gen)
    ids = torch.full((3, 2), -1, dtype=torch.int32)
    out = fused_experts(torch.randn(3, 16, generator=gen), w13, w2, torch.rand(3, 2), ids)
    assert torch.equal(out, torch.zeros(3, 16))


def test_fused_moe_is_select_then_experts():
    gen = torch.Generator().manual_seed(5)
    w13, w2 = _weights(8, 32, 16, gen)
    x, logits = torch.randn(6, 32, generator=gen), torch.randn(6, 8, generator=gen)
    routing = MoERouting(top_k=2, renormalize=True)
    want = fused_experts(x, w13, w2, *moe_select_experts(logits, routing))
    assert torch.equal(fused_moe(x, logits, w13, w2, routing), want)


def _hf_block(name: str, **extra):
    """An HF sparse-MoE block (router + experts, no shared expert) with random weights."""
    import transformers

    cfg_cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
               "qwen3_moe": transformers.Qwen3MoeConfig}[name]
    cfg = cfg_cls(hidden_size=32, intermediate_size=16, moe_intermediate_size=16,
                  num_experts=8, num_local_experts=8, num_experts_per_tok=3, **extra)
    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
    elif name == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import (
            Qwen2MoeExperts,
            Qwen2MoeTopKRouter,
        )

        class B(torch.nn.Module):  # the block without its shared expert
            def __init__(self, c):
                super().__init__()
                self.gate, self.experts = Qwen2MoeTopKRouter(c), Qwen2MoeExperts(c)

            def forward(self, h):
                _, w, i = self.gate(h.view(-1, h.shape[-1]))
                return self.experts(h.view(-1, h.shape[-1]), i, w).view(h.shape)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
    block = B(cfg)
    gen = torch.Generator().manual_seed(7)
    for p in block.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return block


@pytest.mark.parametrize("name,renormalize,extra", [
    ("mixtral", True, {}),
    ("qwen2_moe", False, {"norm_topk_prob": False}),
    ("qwen3_moe", True, {"norm_topk_prob": True}),
])
def test_fused_moe_equals_hf_blocks(name, renormalize, extra):
    block = _hf_block(name, **extra)
    x = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = block(x)[0]
        logits = F.linear(x[0], block.gate.weight)
        got = fused_moe(x[0], logits, block.experts.gate_up_proj, block.experts.down_proj,
                        MoERouting(top_k=3, renormalize=renormalize))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the conformance kit's MoE cases -------------------------------------------------------

def _platform_offering(*impls):
    from platforms.cpu.platform import CpuPlatform

    class MoEPlatform(CpuPlatform):
        name = "moetest"

        def kernel_overrides(self):
            return list(impls)

    return MoEPlatform()


def _impl(name, fn):
    from platforms.kernels import KernelImpl

    return KernelImpl(name, fn, priority=5, provider="test")


def _reversed_columns(logits, routing, bias=None):
    weights, ids = moe_select_experts(logits, routing, bias)
    return weights.flip(-1), ids.flip(-1)  # another column order is allowed


def test_kit_passes_the_references_in_float32_and_bf16():
    from platforms.testing import check_kernel_overrides

    platform = _platform_offering(_impl("moe_select_experts", _reversed_columns),
                                  _impl("fused_experts", fused_experts),
                                  _impl("fused_moe", fused_moe))
    worst = check_kernel_overrides(platform, dtypes=(torch.float32, torch.bfloat16))
    assert set(worst) == {"moe_select_experts", "fused_experts", "fused_moe"}


def _no_renormalize(logits, routing, bias=None):
    import dataclasses

    return moe_select_experts(logits, dataclasses.replace(routing, renormalize=False), bias)


def _bias_in_weights(logits, routing, bias=None):
    weights, ids = moe_select_experts(logits, routing, bias)
    return (weights if bias is None else weights + bias[ids.long()].float()), ids


def _ignores_groups(logits, routing, bias=None):
    import dataclasses

    return moe_select_experts(logits, dataclasses.replace(routing, num_expert_group=None,
                                                          topk_group=None), bias)


def _minus_one_is_last_expert(hidden, w13, w2, weights, ids, activation="silu"):
    return fused_experts(hidden, w13, w2, weights, ids % w13.shape[0], activation)


def _up_then_gate(hidden, w13, w2, weights, ids, activation="silu"):
    return fused_experts(hidden, w13.roll(w13.shape[1] // 2, dims=1), w2, weights, ids)


@pytest.mark.parametrize("name,fn", [
    ("moe_select_experts", _no_renormalize),
    ("moe_select_experts", _bias_in_weights),
    ("moe_select_experts", _ignores_groups),
    ("fused_experts", _minus_one_is_last_expert),
    ("fused_experts", _up_then_gate),
])
def test_kit_fails_a_wrong_moe_op(name, fn):
    from platforms.testing import check_kernel_overrides

    with pytest.raises(AssertionError, match=name):
        check_kernel_overrides(_platform_offering(_impl(name, fn)))


@pytest.mark.parametrize("name,renormalize,extra", [
    ("mixtral", True, {}),
    ("qwen2_moe", False, {"norm_topk_prob": False}),
    ("qwen3_moe", True, {"norm_topk_prob": True}),
])
def test_fused_moe_in_bf16_follows_hf(name, renormalize, extra):
    """HF runs each expert in bf16 and adds the experts in id order in bf16: the reference
    does the same: equal to Qwen's bit for bit, within a bf16 rounding of Mixtral's (which
    multiplies by the float32 weight where Qwen and the reference take its bf16 cast)."""
    block = _hf_block(name, **extra).to(torch.bfloat16)
    x = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(8)).bfloat16()
    with torch.no_grad():
        want = block(x)[0]
        logits = F.linear(x[0], block.gate.weight)
        got = fused_moe(x[0], logits, block.experts.gate_up_proj, block.experts.down_proj,
                        MoERouting(top_k=3, renormalize=renormalize))
    assert got.dtype == torch.bfloat16
    if name != "mixtral":  # bit for bit
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
