"""`EngineArgs` -> `EngineConfig`: find the model, read its config, fix every default.

Rule: everything that depends on the model is decided here, once, and checked: unknown
architecture, too long a `max_model_len`, a token budget that cannot hold one prompt are
ValueErrors naming the value, the limit and the flag. `ModelConfig.dtype` is None when the
user asked for `auto`: the platform picks then (`platform.resolve_dtype(checkpoint_dtype(m))`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import torch

from engine.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.models.loader.source import ModelSource, locate
from engine.models.registry import resolve_model_impl

if TYPE_CHECKING:  # the arguments sit above the models; only their fields are read here
    from engine.engine_args import EngineArgs

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "max_new_tokens")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def resolve_model_config(args: EngineArgs) -> EngineConfig:
    source = locate(args.model, args.revision)
    gguf_fields: Optional[dict[str, Any]] = None
    if source.gguf_file is not None:
        from engine.models.loader.gguf_model import GGUFFile, hf_config_from_gguf

        gguf = GGUFFile(source.gguf_file)
        hf_config, gguf_fields = hf_config_from_gguf(gguf), gguf.fields
    else:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(source.directory,
                                               trust_remote_code=args.trust_remote_code)
    architecture, model_impl = resolve_model_impl(
        hf_config, args.model_impl, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size)
    if args.enable_expert_parallel and model_impl == "transformers":
        raise ValueError("--enable-expert-parallel: the transformers fallback keeps every "
                         "expert on every rank; run a native MoE class (--model-impl native) "
                         "or leave the flag out.")
    tokenizer = _tokenizer_source(args, source)
    max_model_len = _max_model_len(args.max_model_len, hf_config)
    check_config_features(hf_config, max_model_len)
    model = ModelConfig(
        model=source.gguf_file or source.directory,
        tokenizer=tokenizer.gguf_file or tokenizer.directory,
        load_format=_load_format(args.load_format, source),
        hf_config=hf_config,
        dtype=None if args.dtype == "auto" else _DTYPES[args.dtype],
        max_model_len=max_model_len,
        architecture=architecture,
        model_impl=model_impl,
        gguf_file=source.gguf_file,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        chat_template=_chat_template(
            args.chat_template, tokenizer,
            gguf_fields if tokenizer.gguf_file == source.gguf_file else None),
        generation_defaults=_generation_defaults(args.generation_config, source),
    )
    return EngineConfig(
        model=model,
        cache=CacheConfig(args.block_size, args.enable_prefix_caching, args.kv_cache_memory,
                          args.num_kv_blocks, args.gpu_memory_utilization),
        scheduler=_scheduler_config(args, max_model_len),
        device=args.device,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        max_logprobs=args.max_logprobs,
        structured_outputs_backend=args.structured_outputs_backend,
        reasoning_parser=args.reasoning_parser,
        parallel=_parallel_config(args, hf_config),
        lora=lora_config(args, model_impl),
    )


_LORA_LIMITS = ("max_loras", "max_lora_rank", "max_cpu_loras")


def lora_config(args: EngineArgs, model_impl: str = "native") -> Optional[LoRAConfig]:
    """`LoRAConfig` with --enable-lora (None without it), each limit checked. Any positive
    max_lora_rank is accepted (vLLM allows a fixed set, 8 ... 512, that its kernels were
    built for; our slots are sized to the value and the ops take any width)."""
    if not args.enable_lora:
        # A limit away from its default (the CLI sets every field, at its default when the
        # user gave none, so being set alone says nothing).
        fields = type(args).model_fields
        given = [name for name in _LORA_LIMITS
                 if getattr(args, name) != fields[name].default]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is set but LoRA is off; pass "
                             "--enable-lora (enable_lora=True) or leave it out.")
        return None
    if model_impl == "transformers":
        raise ValueError("--enable-lora: the transformers fallback runs HF's own linear "
                         "layers, which carry no adapter slots; run a native model class "
                         "(--model-impl native) or leave --enable-lora out.")
    max_loras, max_lora_rank = args.max_loras, args.max_lora_rank
    max_cpu_loras = max_loras if args.max_cpu_loras is None else args.max_cpu_loras
    if max_loras < 1:
        raise ValueError(f"--max-loras is {max_loras}; it must be at least 1.")
    if max_lora_rank < 1:
        raise ValueError(f"--max-lora-rank is {max_lora_rank}; it must be at least 1.")
    if max_cpu_loras < max_loras:
        raise ValueError(f"--max-cpu-loras {max_cpu_loras} is below --max-loras {max_loras}: "
                         "every adapter on the device is also kept in host memory; raise "
                         f"--max-cpu-loras to at least {max_loras} or leave it out.")
    return LoRAConfig(max_loras, max_lora_rank, max_cpu_loras)


def check_config_features(hf_config: Any, max_model_len: int) -> None:
    """ValueError naming a config feature the engine does not implement, where running
    without it would give outputs that differ from the model's."""
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        raise ValueError(f"quantization_config (quant_method {method!r}): quantized "
                         "checkpoints are not supported yet; use the unquantized weights or "
                         "a GGUF file (dequantized at load).")


def _parallel_config(args: EngineArgs, hf_config: Any) -> ParallelConfig:
    """Sizes checked against the model; the executor backend chosen when not given."""
    from engine.distributed.pipeline import check_pipeline_parallel
    from engine.distributed.sharding import check_tensor_parallel

    tp, pp, dp = args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size
    problems = check_pipeline_parallel(hf_config.num_hidden_layers, pp)
    if problems:
        raise ValueError("The model cannot be split over --pipeline-parallel-size "
                         f"{pp}:\n  " + "\n  ".join(problems))
    if pp > 1 and args.distributed_executor_backend == "uniproc":
        raise ValueError(f"--pipeline-parallel-size {pp} needs one process per stage: pass "
                         "--distributed-executor-backend mp or ray (or leave it out).")
    problems = check_tensor_parallel(hf_config, tp)
    if problems:
        raise ValueError("The model cannot be split over --tensor-parallel-size "
                         f"{tp}:\n  " + "\n  ".join(problems))
    backend = args.distributed_executor_backend or ("mp" if tp * pp > 1 else "uniproc")
    if args.enable_expert_parallel:
        _check_expert_parallel(hf_config, tp)
    return ParallelConfig(tp, pp, dp, backend,
                          enable_expert_parallel=args.enable_expert_parallel)


def num_experts(hf_config: Any) -> Optional[int]:
    """Routed experts per MoE layer (Mixtral, Qwen-MoE, DeepSeek names), None if dense."""
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    return None


def _check_expert_parallel(hf_config: Any, tp: int) -> None:
    experts = num_experts(hf_config)
    if experts is None:
        raise ValueError("--enable-expert-parallel: the model has no mixture-of-experts "
                         "layers; leave the flag out.")
    if experts % tp:
        raise ValueError(f"--enable-expert-parallel: {experts} experts do not split evenly "
                         f"over --tensor-parallel-size {tp}; pick a size that divides "
                         f"{experts}.")


def checkpoint_dtype(model_config: ModelConfig) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 for GGUF, which is dequantized)."""
    if model_config.gguf_file is not None:
        return torch.float32
    cfg = model_config.hf_config
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _tokenizer_source(args: EngineArgs, model: ModelSource) -> ModelSource:
    if args.tokenizer is None:
        return model
    return locate(args.tokenizer, args.revision, flag="--tokenizer")


def _load_format(requested: str, source: ModelSource) -> str:
    natural = "gguf" if source.gguf_file is not None else "safetensors"
    if requested in ("auto", "dummy", natural):
        return natural if requested == "auto" else requested
    raise ValueError(
        f"load_format {requested!r} does not fit the model ({natural} checkpoint); pass "
        f"--load-format auto, {natural} or dummy."
    )


def _max_model_len(requested: Optional[int], hf_config: Any) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("The model's config has no max_position_embeddings; pass "
                             "--max-model-len.")
        return int(limit)
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_model_len {requested} is larger than the model's maximum {limit} "
            f"(max_position_embeddings); pass --max-model-len {limit} or less."
        )
    return requested


def _scheduler_config(args: EngineArgs, max_model_len: int) -> SchedulerConfig:
    budget = args.max_num_batched_tokens
    if budget is None:
        budget = (DEFAULT_MAX_NUM_BATCHED_TOKENS if args.enable_chunked_prefill
                  else max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS))
    if not args.enable_chunked_prefill and budget < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens {budget} is smaller than max_model_len {max_model_len} "
            f"with chunked prefill off, so a long prompt could never run; raise "
            f"--max-num-batched-tokens, lower --max-model-len, or pass --enable-chunked-prefill."
        )
    return SchedulerConfig(args.max_num_seqs, budget, max_model_len,
                           args.enable_chunked_prefill, args.scheduling_policy,
                           args.async_scheduling)


def _chat_template(override: Optional[str], tokenizer: ModelSource,
                   gguf_fields: Optional[dict[str, Any]]) -> Optional[str]:
    """--chat-template (a file or the text itself), else the tokenizer's own.
    `gguf_fields`: the tokenizer GGUF's metadata when already read."""
    if override is not None:
        if os.path.isfile(override):
            with open(override, encoding="utf-8") as f:
                return f.read()
        if "{{" in override or "{%" in override:
            return override
        raise ValueError(
            f"--chat-template {override!r} is neither an existing file nor template text "
            f"(no '{{{{' or '{{%'); pass a path to a .jinja file or the template itself."
        )
    if tokenizer.gguf_file is not None:
        if gguf_fields is None:
            from engine.models.loader.gguf_reader import GGUFFile

            gguf_fields = GGUFFile(tokenizer.gguf_file).fields
        template = gguf_fields.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None
    return _hf_chat_template(tokenizer.directory)


def _hf_chat_template(directory: str) -> Optional[str]:
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_defaults(setting: str, source: ModelSource) -> Optional[dict[str, Any]]:
    """Sampling defaults present in generation_config.json ('auto': the model's own)."""
    if setting == "none":
        return None
    directory = source.directory if setting == "auto" else setting
    path = os.path.join(directory, "generation_config.json")
    if setting != "auto" and not os.path.isfile(path):
        raise ValueError(
            f"--generation-config {setting!r} holds no generation_config.json; pass 'auto', "
            f"'none' or a directory that has one."
        )
    if setting == "auto" and source.gguf_file is not None:
        return None  # a GGUF file carries no generation config
    values = _read_json(path)
    return {k: values[k] for k in _GENERATION_KEYS if values.get(k) is not None} or None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
