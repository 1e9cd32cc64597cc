"""`LLM`: offline batched generation and chat in one Python call.

Rule: `LLM` is a thin front end. Prompts are validated and tokenized (InputProcessor), sent
to an engine core through the same client interface the server uses, and the outputs are
turned back into text (OutputProcessor). Every prompt is checked before any is submitted,
so one bad prompt fails the call without leaving work behind.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from engine.engine_args import EngineArgs
from engine.engine_core.client import EngineCoreClient
from engine.engine_core.core import EngineCore
from engine.engine_core.inproc import InprocClient
from engine.entrypoints.lora_adapters import AdapterChecker
from engine.inputs import InputProcessor, template_message
from engine.messages.core import LoRARequest
from engine.outputs.output_processor import OutputProcessor
from engine.outputs.request_output import RequestOutput, failure_of
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.tokenizer import eos_token_id as resolve_eos_token_id
from engine.tokenizer import load_tokenizer

# Cumulative counters kept from each step's SchedulerStats.
_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
             "num_prompt_tokens", "num_generation_tokens")

PromptType = Union[str, list[int], dict[str, Any]]
Conversation = list[dict[str, Any]]
LoRARequestArg = Optional[Union[LoRARequest, Sequence[Optional[LoRARequest]]]]


class LLM:
    """An engine in this process. Keyword arguments are the fields of `EngineArgs`."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        self.engine_args = EngineArgs(model=model, **kwargs)
        config = self.engine_args.create_config()
        self.tokenizer = load_tokenizer(config.model)
        self.core: Optional[EngineCore] = None
        self.client: EngineCoreClient
        if config.parallel.data_parallel_size > 1:
            self.client, self.config = _start_replicas(config)
        else:
            self.core = EngineCore(config)
            self.config = self.core.config
            self.client = InprocClient(self.core)
        model_config = self.config.model
        self.input_processor = InputProcessor(
            self.tokenizer,
            max_model_len=model_config.max_model_len,
            max_logprobs=self.config.max_logprobs,
            generation_defaults=model_config.generation_defaults,
            chat_template=model_config.chat_template,
            vocab_size=max(model_config.vocab_size, len(self.tokenizer)),
            structured_outputs_backend=self.config.structured_outputs_backend,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.eos_token_id = resolve_eos_token_id(model_config, self.tokenizer)
        self._adapters = AdapterChecker(self.config)
        self._counter = itertools.count()
        self._totals: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._expert_load: Optional[list[int]] = None  # cumulative, once the core reports
        self.startup_seconds = time.perf_counter() - t0

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_sampling_params()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
        user: Optional[Union[str, Sequence[Optional[str]]]] = None,
        lora_request: LoRARequestArg = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string, a list of token ids, or
        `{"prompt_token_ids": [...]}`); returns one RequestOutput per prompt, in order.
        `priority` (per prompt) orders them under the "priority" policy; `user` (one, or
        per prompt) is whom each is for, the share a "fair" policy balances;
        `lora_request` (one, or per prompt, None for the base model) the adapter each runs
        with (needs enable_lora=True)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_for(prompt_list, sampling_params)
        loras = self._loras_for(prompt_list, lora_request)
        users = [user] * len(prompt_list) if user is None or isinstance(user, str) else list(user)
        for name, values in (("priority", priority), ("user", users)):
            if values is not None and len(values) != len(prompt_list):
                raise ValueError(f"{name} has {len(values)} entries but there are "
                                 f"{len(prompt_list)} prompts.")
        processed = [
            self.input_processor.process(_prompt_input(p), sp)
            for p, sp in zip(prompt_list, params_list)
        ]
        request_ids = []
        for i, (text, token_ids, sp) in enumerate(processed):
            if text is None and isinstance(prompt_list[i], dict):
                text = prompt_list[i].get("prompt")
            request_id = str(next(self._counter))
            request_ids.append(request_id)
            sp = sp.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            core_requests = self.output_processor.add_request(
                request_id, text, token_ids, sp, time.time(),
                priority[i] if priority is not None else 0, self.eos_token_id, users[i],
                lora_request=loras[i],
            )
            for core_request in core_requests:
                self.client.add_request(core_request)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Union[Conversation, Sequence[Conversation]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        tools: Optional[list[dict[str, Any]]] = None,
        lora_request: LoRARequestArg = None,
    ) -> list[RequestOutput]:
        """Chat completion for one conversation (a list of {"role", "content"} dicts) or
        several; the model's chat template (or `chat_template`) builds each prompt, with
        `tools` (OpenAI tool definitions) when given; `lora_request` as in `generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        processor = self.input_processor
        if chat_template is not None:
            processor = InputProcessor(
                self.tokenizer, self.config.model.max_model_len, self.config.max_logprobs,
                self.config.model.generation_defaults, chat_template,
                vocab_size=max(self.config.model.vocab_size, len(self.tokenizer)),
                structured_outputs_backend=self.config.structured_outputs_backend,
            )
        prompts = [
            processor.apply_chat_template(
                [template_message(m, j) for j, m in enumerate(conv)], add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=chat_template_kwargs,
                continue_final_message=continue_final_message, tools=tools,
            )
            for conv in conversations
        ]
        # The template already holds the special tokens (BOS); don't add them again.
        token_prompts = [
            {"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False), "prompt": p}
            for p in prompts
        ]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def reset_prefix_cache(self) -> bool:
        if self.core is None:
            return self.client.call_utility("reset_prefix_cache")
        return self.core.reset_prefix_cache()

    def start_profile(self, directory: str) -> None:
        """Record what every worker runs (host and, where torch can see it, device) until
        `stop_profile()`: one Chrome trace and one op table per rank in `directory`."""
        if self.core is None:
            self.client.call_utility("start_profile", directory)
        else:
            self.core.start_profile(directory)

    def stop_profile(self) -> list[str]:
        """Stop recording; the files written (a list per data-parallel replica)."""
        if self.core is None:
            return self.client.call_utility("stop_profile")
        return self.core.stop_profile()

    def get_metrics(self) -> dict[str, Any]:
        """Counters since this LLM started (prefix-cache queries/hits in tokens, preemptions,
        prompt and generation tokens), the current KV-cache usage (the mean over
        data-parallel replicas, as of their last step) and, with expert-parallel MoE
        layers, `moe_expert_load`: token-slots routed to each expert, summed over layers."""
        if self.core is None:
            usage = self.client.latest_stats.kv_cache_usage
        else:
            usage = self.core.scheduler.kv_cache.usage
        metrics: dict[str, Any] = {**self._totals, "kv_cache_usage": usage}
        if self._expert_load is not None:
            metrics["moe_expert_load"] = list(self._expert_load)
        return metrics

    def shutdown(self) -> None:
        """Stop the engine: its workers, or its core processes with data parallelism."""
        self.client.shutdown()

    # ---- internals ----
    def _add_expert_load(self, load: Optional[list[int]]) -> None:
        if load is None:
            return
        if self._expert_load is None:
            self._expert_load = [0] * len(load)
        self._expert_load = [a + b for a, b in zip(self._expert_load, load, strict=True)]

    def _params_for(self, prompts: list, params: Any) -> list[SamplingParams]:
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(
                f"Got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or "
                "one per prompt."
            )
        return params

    def _loras_for(self, prompts: list, lora_request: LoRARequestArg
                   ) -> list[Optional[LoRARequest]]:
        """One adapter (or None) per prompt, each checked (ValueError) before any is sent."""
        if lora_request is None:
            return [None] * len(prompts)
        if isinstance(lora_request, LoRARequest):
            loras: list[Optional[LoRARequest]] = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"Got {len(loras)} lora_request entries for {len(prompts)} "
                                 "prompts; pass one, or one per prompt (None: the base "
                                 "model).")
        for lora in loras:
            if lora is not None:
                self._adapters.check_request(lora)
        return loras

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while len(finished) < len(request_ids):
                outputs = self.client.get_output()
                if outputs.scheduler_stats is not None:
                    for name in _COUNTERS:
                        self._totals[name] += getattr(outputs.scheduler_stats, name)
                    self._add_expert_load(outputs.scheduler_stats.expert_load)
                request_outputs, to_abort = self.output_processor.process_outputs(outputs)
                self.client.abort_requests(to_abort)
                for out in request_outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            # Leave nothing running if the caller interrupts us.
            pending = [r for r in request_ids if r not in finished]
            for r in pending:
                self.client.abort_requests(self.output_processor.abort_request(r))
            raise
        finally:
            bar.close()
        results = [finished[r] for r in request_ids]
        for out in results:
            error = failure_of(out, outputs=results)
            if error is not None:
                raise error
        return results


def _start_replicas(config: Any) -> tuple[Any, Any]:
    """A client over `data_parallel_size` core processes, ready, and the config as the
    cores resolve it for their platform."""
    from engine.engine_core.core import resolve_for_platform
    from engine.engine_core.dp import DPSyncClient
    from platforms.registry import select_platform

    resolved = resolve_for_platform(config, select_platform(config.device))
    client = DPSyncClient(config)
    client.wait_until_ready()
    return client, resolved


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise ValueError("No prompts given.")
    return prompts


def _prompt_input(prompt: PromptType) -> Union[str, list[int]]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
    return prompt
