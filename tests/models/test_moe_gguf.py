"""GGUF files of mixtures of experts, written here the way llama.cpp's converter writes them
from random HF models: `qwen2moe` (shared expert, its gate stored as [H]), `qwen3moe`, and
`llama` with `llama.expert_count` (Mixtral; q/k rows permuted; stacked experts, or one tensor
per expert as old files have). Our config equals the model's, transformers' own GGUF load
agrees where it reads the architecture, and our model's logits equal the source model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from engine.engine_args import EngineArgs
from engine.models.llama import head_dim_of
from engine.models.loader.gguf_model import GGUFFile, gguf_weights, hf_config_from_gguf
from tests.models.test_moe import mixtral_config, qwen2_moe_config, qwen3_moe_config

gguf = pytest.importorskip("gguf")

VOCAB = 300
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp",
          "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rope permutation of q/k rows (convert_hf_to_gguf.LlamaModel.permute)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(model, arch: str, per_expert: bool):
    """(GGUF name, float32 array) as llama.cpp's converter writes them."""
    config = model.config
    for name, param in model.state_dict().items():
        data = param.detach().float().numpy().copy()
        if name in _TOP:
            yield _TOP[name], data
            continue
        _, _, layer, *middle, kind = name.split(".")
        key = ".".join(middle)
        if key == "mlp.experts":  # transformers' fused [E, 2I, H] / [E, H, I]
            if kind == "gate_up_proj":
                gate, up = np.split(data, 2, axis=1)
                parts = {"ffn_gate": gate, "ffn_up": up}
            else:
                parts = {"ffn_down": data}
            for base, stacked in parts.items():
                if per_expert:
                    for e, one in enumerate(stacked):
                        yield f"blk.{layer}.{base}.{e}.weight", one.copy()
                else:
                    yield f"blk.{layer}.{base}_exps.weight", stacked
            continue
        if arch == "llama" and key in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = (config.num_attention_heads if key.endswith("q_proj")
                     else config.num_key_value_heads)
            data = _permute(data, heads)
        if key == "mlp.shared_expert_gate":
            data = data.reshape(-1)  # llama.cpp keeps it 1-D
        yield f"blk.{layer}.{_NAMES[key]}.{kind}", data


def write_moe_gguf(model, arch: str, path, per_expert: bool = False) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    ints = {"context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "block_count": config.num_hidden_layers,
            "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_key_value_heads,
            "attention.key_length": head_dim, "attention.value_length": head_dim,
            "vocab_size": config.vocab_size, "expert_count": experts,
            "expert_used_count": config.num_experts_per_tok}
    if arch != "llama":
        ints["expert_feed_forward_length"] = config.moe_intermediate_size
    if arch == "qwen2moe":
        ints["expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    for key, value in ints.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    for name, data in _tensors(model, arch, per_expert):
        writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn_like(param))
    return model


# GGUF architecture -> the HF config written to it.
CASES = {
    "qwen2moe": lambda: qwen2_moe_config(VOCAB),  # layer 1 dense (mlp_only_layers)
    "qwen3moe": lambda: qwen3_moe_config(VOCAB),  # layers 0, 2 dense (decoder_sparse_step 2)
    "llama": lambda: mixtral_config(VOCAB),
}


@pytest.mark.parametrize("arch,per_expert", [("qwen2moe", False), ("qwen3moe", False),
                                             ("llama", False), ("llama", True)],
                         ids=["qwen2moe", "qwen3moe", "mixtral", "mixtral-per-expert"])
def test_written_moe_gguf_runs_like_the_source(arch, per_expert, tmp_path, model_builder,
                                               prompt_runner):
    source = random_model(CASES[arch]())
    path = tmp_path / f"{arch}.gguf"
    write_moe_gguf(source, arch, path, per_expert)
    ours = hf_config_from_gguf(GGUFFile(str(path)))
    want = source.config
    assert type(ours) is type(want)
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "intermediate_size", "qkv_bias"):
        if hasattr(want, key):
            assert getattr(ours, key) == getattr(want, key), key
    assert head_dim_of(ours) == head_dim_of(want)
    layers = range(want.num_hidden_layers)
    if arch != "llama":
        from engine.models.qwen2_moe import is_sparse_layer

        assert [is_sparse_layer(ours, i) for i in layers] == \
            [is_sparse_layer(want, i) for i in layers]
    model, backend = model_builder(EngineArgs(model=str(path)).create_config().model)
    ids = torch.randint(3, VOCAB, (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(ids[None]).logits[0]
    torch.testing.assert_close(prompt_runner(model, backend, ids, chunks=[9, 12]), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe"])
def test_weights_equal_transformers_gguf_load(arch, tmp_path):
    """transformers reads qwen2moe/qwen3moe GGUF (not Mixtral's `llama` with experts), but
    not the expert sizes: the file here uses its defaults' sizes so its load is whole."""
    defaults = {"qwen2moe": transformers.Qwen2MoeConfig, "qwen3moe": transformers.Qwen3MoeConfig
                }[arch]()
    config = CASES[arch]()
    config.moe_intermediate_size = defaults.moe_intermediate_size
    config.mlp_only_layers, config.decoder_sparse_step = [], 1  # llama.cpp: every layer sparse
    config.num_hidden_layers = 1
    if arch == "qwen2moe":
        config.shared_expert_intermediate_size = defaults.shared_expert_intermediate_size
    source = random_model(config)
    path = tmp_path / f"{arch}.gguf"
    write_moe_gguf(source, arch, path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype="float32").eval()
    file = GGUFFile(str(path))
    ours = hf_config_from_gguf(file)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "hidden_size", "num_key_value_heads"):
        assert getattr(ours, key) == getattr(theirs.config, key), key
    hf_params = dict(theirs.named_parameters())
    gate_up = {}
    for name, tensor in gguf_weights(file, ours):
        if ".experts." in name:  # ours per expert, theirs fused
            layer, expert, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            gate_up[(layer, expert, proj)] = tensor
            continue
        torch.testing.assert_close(tensor, hf_params[name].detach(), rtol=0, atol=1e-6)
    fused = hf_params["model.layers.0.mlp.experts.gate_up_proj"].detach()
    down = hf_params["model.layers.0.mlp.experts.down_proj"].detach()
    for e in range(ours.num_experts):
        torch.testing.assert_close(torch.cat((gate_up[("0", e, "gate_proj")],
                                              gate_up[("0", e, "up_proj")])), fused[e])
        torch.testing.assert_close(gate_up[("0", e, "down_proj")], down[e])
