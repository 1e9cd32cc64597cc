"""The model runner: one flattened forward for a mixed batch, then sampling.

Rule: the runner never decides anything. The scheduler said which requests advance by how
many tokens; the runner turns that into flat tensors (no padding to the longest prompt),
runs the model once over prefill chunks and decodes together, samples for the requests that
reached the end of their known tokens, and appends those tokens to its own state.

Startup is a checklist: load, profile one full-size step, size the KV cache from the measured
memory, bind caches, warm up (and capture).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Optional, Union

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed import SINGLE, ParallelContext, use_parallel
from engine.lora import LoRAManager
from engine.messages.core import LogprobsEntry
from engine.messages.step import ModelRunnerOutput, NewRequestData, SchedulerOutput
from engine.models.layers.attention import Attention, kv_cache_layout
from engine.models.layers.moe import FusedMoE
from engine.models.loader import load_model
from engine.sampling_params import SamplingParams
from engine.worker.input_batch import InputBatch, StepInputs
from engine.worker.profiler import TraceProfiler
from engine.worker.sampler import LogprobsTensors, Sampler, logprob_tensors, row_logprobs
from engine.worker.sampling_metadata import RequestSamplingState, SamplingMetadata
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    CommonAttentionMetadata,
    GroupedAttentionMetadata,
    Platform,
)
from platforms.kernels import use_kernels
from platforms.registry import kernel_table
from platforms.util import cdiv

logger = logging.getLogger(__name__)


def kv_cache_budget(platform: Platform, kv_cache_memory: Optional[int], utilization: float,
                    model_bytes: int) -> int:
    """Bytes the KV cache may take: what the user gave (--kv-cache-memory); else the
    measured budget, capped at `capabilities.default_kv_cache_memory` where one is set.
    Where the platform measures its peak, the budget is total x utilization - the profiling
    step's peak (which holds the weights, activations and the runtime's own memory); else
    free x utilization - the weights (on a device that cannot say what a step takes, the
    weights count twice, once in `free` and once here: the safe side)."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    caps = platform.capabilities
    free, total = platform.memory_info()
    if caps.measures_peak_memory:
        budget = int(total * utilization) - platform.peak_memory_bytes()
    else:
        budget = int(free * utilization) - model_bytes
    if caps.default_kv_cache_memory is not None:
        budget = min(budget, caps.default_kv_cache_memory)
    return budget


def step_grad_mode(platform: Platform) -> contextlib.AbstractContextManager[Any]:
    """The no-grad mode a step (and capture) runs under: inference_mode, the cheapest, or
    no_grad where the platform's tensors cannot be inference tensors."""
    return torch.inference_mode() if platform.capabilities.inference_mode else torch.no_grad()


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform,
                 parallel: ParallelContext = SINGLE, local_rank: int = 0) -> None:
        self.config = config
        self.platform = platform
        self.parallel = parallel  # this rank's place; layers read it when built
        self.device = platform.device(local_rank)
        model_config = config.model
        self.dtype = model_config.dtype
        # KV-cache groups (one for most models; Gemma's local and global layers make
        # several); a backend per group is built once the model declares its layers.
        self.layout = kv_cache_layout(model_config)
        self.attn_backends: list[Optional[AttentionBackend]] = []
        self._slot_of: dict[Attention, int] = {}  # layer -> the cache tensor it uses
        self.input_batch = InputBatch(config.cache.block_size, self.device,
                                      pin_memory=platform.capabilities.pinned_memory,
                                      vocab_size=model_config.vocab_size)
        self.sampler = Sampler()
        self.model: Optional[torch.nn.Module] = None
        # Adapter slots on the model's linear layers (config.lora set); None: LoRA off.
        self.lora_manager: Optional[LoRAManager] = None
        self.num_blocks = 0
        # The last step's sampled ids (device) and {req_id: row} in them: where the next
        # step finds tokens whose values have not reached the host yet.
        self._last_sampled: Optional[torch.Tensor] = None
        self._awaiting_bitmask = False  # a DeferredSample is out: launch nothing else
        # Page-locked grammar bitmask buffers, used in turn, each with the event recorded
        # after its last upload (see _host_bitmask).
        self._bitmask_buffers: list[tuple[torch.Tensor, Any]] = []
        self._last_sample_row: dict[str, int] = {}
        self.profiler = TraceProfiler()
        self._counting_moe: Optional[list[FusedMoE]] = None  # found at the first take

    # ---- startup ----
    def load_model(self) -> None:
        self.kernels = kernel_table(self.platform)
        with use_kernels(self.kernels), use_parallel(self.parallel):
            self.model = load_model(self.config.model, self.device, self.dtype)
            if self.config.lora is not None:  # before profiling: its slots take memory
                self.lora_manager = LoRAManager(
                    self.model, self.config.lora, self.device, self.dtype,
                    self.config.scheduler.max_num_batched_tokens)
        self._bind_attention()
        self.forward = self.platform.graph_runner(
            self.model.forward, self.config.for_platform(),
            tuple(b for b in self.attn_backends if b is not None))

    @property
    def attn_backend(self) -> AttentionBackend:
        """The first KV-cache group's backend (the only one for most models)."""
        backend = next((b for b in self.attn_backends if b is not None), None)
        if backend is None:
            raise RuntimeError("No attention layer was bound (the model is not loaded).")
        return backend

    def _bind_attention(self) -> None:
        """Give each Attention layer its group's backend and its cache slot; refuse what the
        platform's attention cannot do."""
        assert self.model is not None
        layout, block_size = self.layout, self.config.cache.block_size
        specs: dict[int, AttentionSpec] = {}
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in layers:
            group, slot = layout.place(layer.layer_idx)
            window = layout.groups[group].sliding_window
            declared = layer.sliding_window
            if declared is not None and declared >= self.config.model.max_model_len:
                declared = None  # the window covers every position: full attention
            if declared != window:
                raise ValueError(
                    f"Layer {layer.layer_idx} of {type(self.model).__name__} declares "
                    f"sliding window {layer.sliding_window}, its config says {window}: the "
                    "model class and layer_sliding_windows disagree.")
            spec = dataclasses.replace(layer.spec(self.dtype, block_size), sliding_window=window)
            if specs.setdefault(group, spec) != spec:
                raise ValueError(f"Layers of KV-cache group {group} differ in attention "
                                 f"({specs[group]} vs {spec}).")
            layer.kv_group = group
            self._slot_of[layer] = slot
        self._check_attention_features(specs)
        self.attn_backends = [self.platform.attention_backend(specs[g]) if g in specs else None
                              for g in range(len(layout.groups))]
        for layer in layers:
            layer.backend = self.attn_backends[layer.kv_group]

    def _check_attention_features(self, specs: dict[int, AttentionSpec]) -> None:
        needs = set().union(*(spec.features for spec in specs.values()))
        if len(self.layout.groups) > 1:
            needs.add("kv_cache_groups")
        missing = sorted(needs - self.platform.capabilities.attention_features)
        if missing:
            raise ValueError(
                f"{self.config.model.architecture} needs attention features the "
                f"{self.platform.name} platform does not implement: {', '.join(missing)} "
                "(its Capabilities.attention_features); run it on a platform that has them.")

    def _attn_metadata(self, inputs: StepInputs) -> Any:
        """The forward's attention metadata: the backend's own for one group, a
        GroupedAttentionMetadata with one entry per group otherwise."""
        if len(self.attn_backends) == 1:
            return self.attn_backend.build_metadata(inputs.attn)
        return GroupedAttentionMetadata(
            None if backend is None else backend.build_metadata(common)
            for backend, common in zip(self.attn_backends, inputs.attn_groups))

    @property
    def model_bytes(self) -> int:
        assert self.model is not None
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def bytes_per_block(self) -> int:
        """A block id's bytes: one block in each cache slot tensor."""
        shape = self.attn_backend.kv_cache_shape(1)
        per_layer = int(np.prod(shape)) * torch.empty((), dtype=self.dtype).element_size()
        return per_layer * self.layout.num_slots

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        measured = self.platform.capabilities.measures_peak_memory
        if cache.kv_cache_memory is None and measured:
            self.platform.reset_peak_memory()
            self.profile_run()
            logger.info("Profiling step: peak device memory %.2f GiB",
                        self.platform.peak_memory_bytes() / 2**30)
        budget = kv_cache_budget(self.platform, cache.kv_cache_memory,
                                 cache.gpu_memory_utilization, self.model_bytes)
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"No memory left for the KV cache (budget {budget} bytes, one block needs "
                f"{self.bytes_per_block}); raise --kv-cache-memory or --gpu-memory-utilization."
            )
        return int(num_blocks)

    def profile_run(self) -> None:
        """One throw-away step as large as the scheduler may ever send: max_num_batched_tokens
        prompt tokens spread over min(max_num_seqs, tokens) requests, each sampled, over a
        temporary KV cache just big enough for them (unbound afterwards). The platform
        measures its peak memory; the KV cache then gets what is left."""
        sched = self.config.scheduler
        num_reqs = min(sched.max_num_seqs, sched.max_num_batched_tokens)
        base, extra = divmod(sched.max_num_batched_tokens, num_reqs)
        lens = [min(base + (i < extra), sched.max_model_len) for i in range(num_reqs)]
        block_size = self.config.cache.block_size
        reqs, next_block = [], 0
        num_groups = len(self.layout.groups)
        for i, n in enumerate(lens):
            num_req_blocks = cdiv(n, block_size)
            tables = []
            for _ in range(num_groups):
                tables.append(list(range(next_block, next_block + num_req_blocks)))
                next_block += num_req_blocks
            reqs.append(NewRequestData(
                req_id=f"__profile_{i}__", prompt_token_ids=[0] * n, output_token_ids=[],
                sampling_params=SamplingParams(max_tokens=1), block_ids=tuple(tables),
                num_computed_tokens=0,
            ))
        self.initialize_kv_cache(next_block)
        lora_context = None if self.lora_manager is None else self.lora_manager.context
        if lora_context is not None:  # measure the LoRA ops' memory too (all slots -1)
            lora_context.always_apply = True
        try:
            self.execute_model(SchedulerOutput(reqs, [], {r.req_id: len(r.prompt_token_ids)
                                                          for r in reqs}, sum(lens)))
            self.platform.synchronize()
        finally:
            if lora_context is not None:
                lora_context.always_apply = False
            self.input_batch.update(SchedulerOutput(
                [], [], {}, 0, finished_req_ids={r.req_id for r in reqs}))
            assert self.model is not None
            for layer in self.model.modules():
                if isinstance(layer, Attention):
                    layer.kv_cache = None
            self.num_blocks = 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """One cache tensor per slot this rank's layers use; a layer of group g at slot j
        keeps its K/V in tensor j, in the blocks group g's tables name."""
        assert self.model is not None
        shapes = {b.kv_cache_shape(num_blocks) for b in self.attn_backends if b is not None}
        if len(shapes) != 1:
            raise ValueError(f"The KV-cache groups' layers have different cache shapes "
                             f"{sorted(shapes)}; groups of one pool need one shape.")
        shape = shapes.pop()
        tensors: dict[int, torch.Tensor] = {}
        for layer, slot in self._slot_of.items():
            if slot not in tensors:
                tensors[slot] = self.platform.allocate_kv_cache(shape, self.dtype, self.device)
            layer.kv_cache = tensors[slot]
        self.num_blocks = num_blocks

    # ---- expert load ----
    def take_expert_load(self) -> Optional[list[int]]:
        """Token-slots routed to each global expert since the last call, summed over this
        rank's expert-parallel MoE layers, whose counts are then zeroed; None when the model
        has none. One host sync: call it now and then (the core: about once a second),
        never per step."""
        if self._counting_moe is None:
            assert self.model is not None
            self._counting_moe = [m for m in self.model.modules()
                                  if isinstance(m, FusedMoE) and m.expert_load is not None]
        if not self._counting_moe:
            return None
        total = torch.stack([m.expert_load for m in self._counting_moe]).sum(0)
        for layer in self._counting_moe:
            layer.expert_load.zero_()
        return total.tolist()

    # ---- profiling ----
    def start_profile(self, directory: str, name: str) -> None:
        self.profiler.start(directory, name)

    def stop_profile(self) -> list[str]:
        return self.profiler.stop(self.platform.synchronize)

    # ---- one step ----
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(out).result()

    def execute_model_async(self, out: SchedulerOutput) -> Union[StepHandle, DeferredSample]:
        """Launch one step; the handle's `result()` waits for its sampled tokens. The next
        step may be launched before that: its decodes read those tokens on the device."""
        with step_grad_mode(self.platform):
            return self._dispatch(out)

    def _dispatch(self, out: SchedulerOutput) -> Union[StepHandle, DeferredSample]:
        if self._awaiting_bitmask:
            raise RuntimeError("A step was launched while the previous one waits for its "
                               "grammar bitmask; give it first (DeferredSample.sample).")
        failed = self.input_batch.update(out)
        if out.total_num_scheduled_tokens == 0:
            return StepHandle.done(ModelRunnerOutput(req_ids=[], sampled_token_ids=[],
                                                     failed=failed))
        inputs = self.input_batch.prepare(out, self._last_sample_row)
        if inputs.pending_dst is not None:
            assert self._last_sampled is not None and inputs.pending_src is not None
            inputs.input_ids[inputs.pending_dst] = self._last_sampled[inputs.pending_src]
        if self.lora_manager is not None:
            failed = self._set_lora_slots(inputs, failed)
        attn_metadata = self._attn_metadata(inputs)
        hidden = self.forward(inputs.input_ids, inputs.positions, attn_metadata)
        prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        if out.grammar_deferred:
            return DeferredSample(self, inputs, hidden, out, prompt_logprobs, failed)
        return self._sample_and_hand_over(inputs, hidden, out, prompt_logprobs, failed)

    def _set_lora_slots(self, inputs: StepInputs, failed: dict[str, str]
                        ) -> dict[str, str]:
        """Each token's adapter slot into the LoRA context (-1: the base model). A request
        whose adapter cannot be loaded runs on the base model this step and is reported
        failed (the scheduler then finishes it with the reason)."""
        assert self.lora_manager is not None
        manager = self.lora_manager
        manager.begin_step()
        slots = np.full(len(inputs.req_ids), -1, dtype=np.int32)
        for i, req_id in enumerate(inputs.req_ids):
            lora_request = self.input_batch.requests[req_id].lora_request
            if lora_request is None:
                continue
            try:
                slots[i] = manager.slot_of(lora_request)
            except ValueError as exc:
                failed = {**failed, req_id: str(exc)}
        manager.context.set_step(np.repeat(slots, np.diff(inputs.query_start_loc_np)))
        return failed

    def _sample_and_hand_over(self, inputs: StepInputs, hidden: torch.Tensor,
                              out: SchedulerOutput, prompt_logprobs: dict[str, LogprobsTensors],
                              failed: Optional[dict[str, str]]) -> StepHandle:
        sampled, logprobs, num_logprobs = self._sample(inputs, hidden, out)
        # Where the next step finds the values of this step's samples (its placeholders).
        self._last_sampled = sampled
        self._last_sample_row = {inputs.req_ids[i]: row
                                 for row, i in enumerate(inputs.sample_req_idx)}
        return StepHandle(inputs.req_ids, inputs.sample_req_idx,
                          *self._to_host(sampled, logprobs, prompt_logprobs), num_logprobs,
                          failed)

    def _apply_grammar(self, logits: torch.Tensor, inputs: StepInputs,
                       out: SchedulerOutput) -> None:
        row_of = {inputs.req_ids[i]: row for row, i in enumerate(inputs.sample_req_idx)}
        keep = [k for k, r in enumerate(out.structured_req_ids) if r in row_of]
        if not keep:
            return
        array = out.grammar_bitmask
        if len(keep) < len(array):
            array = array[keep]
        rows_list = [row_of[out.structured_req_ids[k]] for k in keep]
        if not self.platform.capabilities.pinned_memory:
            self.kernels["apply_token_bitmask"](
                logits, torch.from_numpy(array).to(logits.device),
                torch.tensor(rows_list, dtype=torch.int64).to(logits.device))
            return
        # From pageable memory the upload would wait for the device to finish the work
        # queued before it, and the host would stop running ahead.
        host, event = self._host_bitmask(*array.shape)
        host.numpy()[...] = array
        bitmask = host.to(logits.device, non_blocking=True)
        event.record()
        rows = torch.tensor(rows_list, dtype=torch.int64).pin_memory()
        self.kernels["apply_token_bitmask"](logits, bitmask,
                                            rows.to(logits.device, non_blocking=True))

    def _host_bitmask(self, rows: int, words: int) -> tuple[torch.Tensor, Any]:
        """A page-locked int32 [rows, words] view for a step's bitmask and the event to record
        after its upload. Two buffers, used in turn; one is written again only once its last
        upload is done (its event), and it grows to the largest batch seen."""
        if len(self._bitmask_buffers) < 2:
            buffer = torch.empty((rows, words), dtype=torch.int32, pin_memory=True)
            self._bitmask_buffers.append((buffer, self.platform.create_event()))
        else:
            self._bitmask_buffers.reverse()
        buffer, event = self._bitmask_buffers[-1]
        event.synchronize()
        if buffer.shape[0] < rows or buffer.shape[1] != words:
            buffer = torch.empty((max(rows, buffer.shape[0]), words), dtype=torch.int32,
                                 pin_memory=True)
            self._bitmask_buffers[-1] = (buffer, event)
        return buffer[:rows], event

    def _to_host(self, sampled: Optional[torch.Tensor], logprobs: Optional[LogprobsTensors],
                 prompt_logprobs: dict[str, LogprobsTensors]) -> tuple[Any, ...]:
        """Start copying the step's results to the host: (sampled ids, logprobs, prompt
        logprobs, event to wait on before reading them). A device that runs asynchronously
        copies into page-locked memory without waiting; others copy now (event None)."""
        caps = self.platform.capabilities
        pin = caps.executes_asynchronously and caps.pinned_memory
        host = None
        if sampled is not None and pin:
            host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
        elif sampled is not None:
            host = sampled.cpu()  # the tensor itself where the device is the host
        host_logprobs = None if logprobs is None else logprobs.to_host(pin)
        host_prompt = {r: t.to_host(pin) for r, t in prompt_logprobs.items()}
        event = None
        if pin:
            event = self.platform.create_event()
            event.record()
        return host, host_logprobs, host_prompt, event

    def _sample(
        self, inputs: StepInputs, hidden: torch.Tensor, out: SchedulerOutput
    ) -> tuple[Optional[torch.Tensor], Optional[LogprobsTensors], list[Optional[int]]]:
        """The sampled ids of the sampling rows, their logprobs (both on the device), and
        each row's logprobs k. Rows under a structured-output grammar first lose every
        token the scheduler's bitmask forbids."""
        if not inputs.sample_req_idx:
            return None, None, []
        assert self.model is not None
        logits = self.model.compute_logits(hidden[inputs.sample_token_idx])
        if out.grammar_bitmask is not None:
            self._apply_grammar(logits, inputs, out)
        rows = []
        for i in inputs.sample_req_idx:
            s = self.input_batch.requests[inputs.req_ids[i]]
            rows.append(
                RequestSamplingState(
                    s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.eos_token_id,
                    num_pending=int(inputs.num_placeholders_np[i]),
                )
            )
        meta = SamplingMetadata.build(rows, logits.shape[-1], logits.device,
                                      pin_memory=self.platform.capabilities.pinned_memory)
        result = self.sampler(logits, meta)
        return result.sampled, result.logprob_tensors, result.num_logprobs

    def _prompt_logprobs(
        self, inputs: StepInputs, hidden: torch.Tensor
    ) -> dict[str, LogprobsTensors]:
        """Logprobs of prompt tokens 1.. for requests that asked, over this step's chunk
        (still on the device)."""
        result: dict[str, LogprobsTensors] = {}
        assert self.model is not None
        for i, req_id in enumerate(inputs.req_ids):
            state = self.input_batch.requests[req_id]
            k = state.sampling_params.prompt_logprobs
            prompt_len = len(state.prompt_token_ids)
            start = int(inputs.start_positions_np[i])
            count = int(inputs.query_start_loc_np[i + 1] - inputs.query_start_loc_np[i])
            # Position p predicts prompt token p + 1; the last prompt position predicts output.
            end = min(start + count, prompt_len - 1)
            if k is None or end <= start:
                continue
            row0 = int(inputs.query_start_loc_np[i])
            logits = self.model.compute_logits(hidden[row0 : row0 + end - start])
            targets = torch.as_tensor(state.prompt_token_ids[start + 1 : end + 1],
                                      dtype=torch.long)
            if self.platform.capabilities.pinned_memory:  # a blocking upload waits for the step
                targets = targets.pin_memory()
            targets = targets.to(logits.device, non_blocking=True)
            result[req_id] = logprob_tensors(logits, targets, k)
        return result

    def warm_up(self, num_tokens: int = 16) -> None:
        """Run one throw-away step so first-call costs (allocator, kernel selection, lazy
        init) are paid at startup, not by the first request. It writes block 0 only, whose
        contents are always overwritten before a request reads them."""
        req = NewRequestData(
            req_id="__warmup__",
            prompt_token_ids=[0] * num_tokens,
            output_token_ids=[],
            sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
            block_ids=tuple([0] * cdiv(num_tokens, self.config.cache.block_size)
                            for _ in self.layout.groups),
            num_computed_tokens=0,
        )
        self.execute_model(SchedulerOutput([req], [], {req.req_id: num_tokens}, num_tokens))
        self.input_batch.update(
            SchedulerOutput([], [], {}, 0, finished_req_ids={req.req_id})
        )
        lora_context = None if self.lora_manager is None else self.lora_manager.context
        if lora_context is not None:  # a captured graph must hold the LoRA ops
            lora_context.always_apply = True
            lora_context.set_step(np.zeros(0, dtype=np.int32))
        with step_grad_mode(self.platform):
            self.forward.capture(self.dummy_decode_batch)
        if lora_context is not None:  # eager or compiled: the host flag decides per step
            lora_context.always_apply = bool(self.forward.captured_sizes)
        self.take_expert_load()  # the profiling and warm-up steps' routing is no load
        self.platform.synchronize()

    def dummy_decode_batch(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`num_tokens` one-token requests at position 0, all in block 0 (whose contents are
        overwritten before any request reads them): what a graph runner captures with."""
        block_size = self.config.cache.block_size
        n = num_tokens
        qsl = torch.arange(n + 1, dtype=torch.int32)
        seq_lens = torch.ones(n, dtype=torch.int32)
        common = CommonAttentionMetadata(
            num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=1,
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
            num_computed_tokens_cpu=torch.zeros(n, dtype=torch.int32),
            query_start_loc=qsl.to(self.device), seq_lens=seq_lens.to(self.device),
            block_table=torch.zeros(n, 1, dtype=torch.int32, device=self.device),
            slot_mapping=(torch.arange(n, dtype=torch.int64) % block_size).to(self.device),
        )
        input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        positions = torch.zeros(n, dtype=torch.int64, device=self.device)
        if len(self.attn_backends) == 1:
            return input_ids, positions, self.attn_backend.build_metadata(common)
        return input_ids, positions, GroupedAttentionMetadata(
            None if b is None else b.build_metadata(common) for b in self.attn_backends)


class DeferredSample:
    """A step whose forward pass is launched and whose sampling waits for its grammar
    bitmask (async scheduling with structured outputs: the core fills it on the host while
    the device runs the forward pass). `sample(bitmask)` launches the sampling; then it is
    a StepHandle. The runner launches nothing else before that."""

    def __init__(self, runner: ModelRunner, inputs: StepInputs, hidden: torch.Tensor,
                 out: SchedulerOutput, prompt_logprobs: dict[str, LogprobsTensors],
                 failed: Optional[dict[str, str]]) -> None:
        self._runner = runner
        self._args: Optional[tuple[Any, ...]] = (inputs, hidden, out, prompt_logprobs, failed)
        self._handle: Optional[StepHandle] = None
        runner._awaiting_bitmask = True

    @property
    def awaiting_bitmask(self) -> bool:
        return self._handle is None

    def sample(self, bitmask: Any) -> None:
        assert self._args is not None, "sample() was called twice"
        inputs, hidden, out, prompt_logprobs, failed = self._args
        self._args = None
        out = dataclasses.replace(out, grammar_bitmask=bitmask, grammar_deferred=False)
        runner = self._runner
        with step_grad_mode(runner.platform):
            self._handle = runner._sample_and_hand_over(inputs, hidden, out, prompt_logprobs,
                                                        failed)
        runner._awaiting_bitmask = False

    def ready(self) -> bool:
        return self._handle is not None and self._handle.ready()

    def result(self) -> ModelRunnerOutput:
        if self._handle is None:
            raise RuntimeError("A deferred step's result was asked before its bitmask "
                               "was given (DeferredSample.sample).")
        return self._handle.result()


class StepHandle:
    """One launched step; `result()` waits for its results to reach the host (once) and
    gives the step's output, a plain message: the runner learns the sampled values from the
    scheduler, with the next steps' `CachedRequestData.new_token_ids`."""

    def __init__(self, req_ids: list[str], sample_req_idx: list[int],
                 sampled: Optional[torch.Tensor], logprobs: Optional[LogprobsTensors],
                 prompt_logprobs: dict[str, LogprobsTensors], event: Any,
                 num_logprobs: list[Optional[int]],
                 failed: Optional[dict[str, str]] = None) -> None:
        self._failed = failed or {}
        self._req_ids, self._sample_req_idx = req_ids, sample_req_idx
        self._sampled = sampled
        self._logprobs, self._prompt_logprobs = logprobs, prompt_logprobs
        self._event, self._num_logprobs = event, num_logprobs
        self._output: Optional[ModelRunnerOutput] = None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> StepHandle:
        handle = cls([], [], None, None, {}, None, [])
        handle._output = output
        return handle

    def ready(self) -> bool:
        """Whether `result()` would return without waiting for the device."""
        return self._output is not None or self._event is None or self._event.query()

    def result(self) -> ModelRunnerOutput:
        if self._output is not None:
            return self._output
        if self._event is not None:
            self._event.synchronize()
        tokens: list[int] = [] if self._sampled is None else self._sampled.tolist()
        sampled: list[list[int]] = [[] for _ in self._req_ids]
        for row, i in enumerate(self._sample_req_idx):
            sampled[i] = [tokens[row]]
        logprobs: Optional[list[Optional[list[LogprobsEntry]]]] = None
        if self._logprobs is not None:
            rows = row_logprobs(self._logprobs.entries(), self._num_logprobs)
            logprobs = [None] * len(self._req_ids)
            for row, i in enumerate(self._sample_req_idx):
                logprobs[i] = rows[row]
        self._output = ModelRunnerOutput(
            req_ids=self._req_ids, sampled_token_ids=sampled, logprobs=logprobs,
            prompt_logprobs={r: t.entries() for r, t in self._prompt_logprobs.items()},
            failed=self._failed)
        return self._output
