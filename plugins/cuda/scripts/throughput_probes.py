"""Probes for profile_throughput.py: per-step host/device accounting of a live `LLM`, and
the grouping of GPU kernel names into categories.

Rule: nothing in engine/ changes. The probes replace bound methods on the live objects
(scheduler, executor, runner, input batch, sampler, output processor) with timed wrappers
by setting instance attributes, and `uninstall` deletes those attributes again, so the
class methods show through unchanged. Wall time is `time.perf_counter`; device time is two
platform events per piece, read only after the run (`finish`), so the probes add no
synchronization of their own and leave any host/device overlap as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from torch.profiler import record_function

# ---- kernel categories -----------------------------------------------------------------

# First match wins, so the engine's own Triton kernels come before the generic words.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # first: the fused all-reduce + RMSNorm kernel's name also says "rms_norm"
    ("all-reduce / gather", ("allreduce", "all_reduce", "allgather", "all_gather",
                             "reducescatter", "nccl", "one_shot", "two_shot", "multimem")),
    ("attention", ("_paged_attention_kernel", "paged_attention")),
    ("merge", ("_merge_splits_kernel", "merge_splits")),
    ("kv write", ("_write_kv_kernel", "write_kv", "reshape_and_cache")),
    ("split-K reduce", ("splitkreduce",)),  # cuBLAS's reduce after a split-K GEMM
    ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "sm90", "cublas", "splitk")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm", "rsqrt")),
    ("rotary", ("rotary", "rope")),
    ("silu", ("silu", "swiglu")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "exponential", "uniform",
                  "distribution", "multinomial")),
    ("copies", ("memcpy", "memset", "copy_kernel", "direct_copy", "batchedcopy")),
)
CATEGORY_ORDER = tuple(name for name, _ in KERNEL_CATEGORIES) + ("other",)


def categorize_kernel(name: str) -> str:
    """The category of a GPU kernel (or memcpy/memset) by its name; "other" if none fits."""
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in lowered for n in needles):
            return category
    return "other"


@dataclass(frozen=True)
class KernelStat:
    name: str
    count: int
    device_us: float  # summed over calls

    @property
    def category(self) -> str:
        return categorize_kernel(self.name)


def group_kernels(stats: Iterable[KernelStat]) -> dict[str, tuple[int, float]]:
    """{category: (calls, device us)} over every category, in CATEGORY_ORDER."""
    grouped = {c: (0, 0.0) for c in CATEGORY_ORDER}
    for s in stats:
        calls, us = grouped[s.category]
        grouped[s.category] = (calls + s.count, us + s.device_us)
    return grouped


# Chrome-trace event categories that are device work (kineto's names).
DEVICE_TRACE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_kernel_stats(trace: dict) -> tuple[list[KernelStat], float]:
    """Device work in a torch.profiler chrome trace: per-name stats (largest first) and the
    busy time in us, the union of the intervals (overlapping streams counted once)."""
    by_name: dict[str, list[float]] = {}
    intervals = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in DEVICE_TRACE_CATEGORIES:
            continue
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        entry = by_name.setdefault(e.get("name", "?"), [0, 0.0])
        entry[0] += 1
        entry[1] += dur
        intervals.append((ts, ts + dur))
    busy, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    stats = [KernelStat(n, int(c), us) for n, (c, us) in by_name.items()]
    return sorted(stats, key=lambda s: -s.device_us), busy


# ---- step buckets ----------------------------------------------------------------------

TOKEN_BUCKETS = (512, 2048, 8192)  # <=512 is what the decode graphs cover
REQ_BUCKETS = (32, 128, 256)


def bucket_label(value: int, edges: tuple[int, ...]) -> str:
    """"<=512", "<=2048", ... or ">8192" for the largest edge exceeded."""
    for edge in edges:
        if value <= edge:
            return f"<={edge}"
    return f">{edges[-1]}"


def choose_windows(steps: list[StepRecord], length: int) -> dict[str, tuple[int, int]]:
    """{kind: (first step, number of steps)} for kind "mixed" (steps with prompt tokens) and
    "decode" (one token per request): the middle `length` steps of the longest run of
    consecutive steps of that kind, so a window sees that kind's steady state. A kind with
    no steps is left out."""
    windows = {}
    for kind, wanted in (("mixed", False), ("decode", True)):
        best_start, best_len, run_start = 0, 0, None
        for i, s in enumerate(steps + [None]):  # None closes the last run
            inside = s is not None and s.num_tokens > 0 and s.is_decode_only == wanted
            if inside and run_start is None:
                run_start = i
            elif not inside and run_start is not None:
                if i - run_start > best_len:
                    best_start, best_len = run_start, i - run_start
                run_start = None
        if best_len:
            n = min(length, best_len)
            windows[kind] = (best_start + (best_len - n) // 2, n)
    return windows


# ---- per-step accounting ---------------------------------------------------------------

# Measured pieces, nested as in EngineCore.step / ModelRunner._execute_model / LLM._run.
STEP = "engine step (core.step)"
SCHEDULE = "  scheduler.schedule"
EXECUTE = "  executor.execute_model[_async]"
UPDATE_BATCH = "    input_batch.update"
PREPARE = "    input_batch.prepare"
METADATA = "    attn_backend.build_metadata"
FORWARD = "    forward (host: launch / graph replay)"
SAMPLE = "    _sample (logits + sampling)"
LOGITS = "      model.compute_logits (host)"
SAMPLER = "      sampler (+ .tolist() sync where it syncs)"
RESULT = "  batch handle .result() (waits for the step)"
UPDATE = "  scheduler.update_from_output"
OUTPUTS = "output_processor.process_outputs (detokenize)"
# Derived: a parent's time that none of its measured children account for.
SAMPLING_META = "      sampling rows + SamplingMetadata.build"
EXECUTE_REST = "    execute_model rest (prompt logprobs, append tokens)"
STEP_REST = "  step rest"
LOOP_REST = "LLM._run rest (tqdm, aborts, loop)"

PIECE_ORDER = (STEP, SCHEDULE, EXECUTE, UPDATE_BATCH, PREPARE, METADATA, FORWARD, SAMPLE,
               LOGITS, SAMPLING_META, SAMPLER, EXECUTE_REST, RESULT, UPDATE, STEP_REST,
               OUTPUTS, LOOP_REST)
_DERIVED = {  # derived piece: (parent, children)
    SAMPLING_META: (SAMPLE, (LOGITS, SAMPLER)),
    EXECUTE_REST: (EXECUTE, (UPDATE_BATCH, PREPARE, METADATA, FORWARD, SAMPLE)),
    STEP_REST: (STEP, (SCHEDULE, EXECUTE, RESULT, UPDATE)),
}


@dataclass
class StepRecord:
    num_tokens: int = 0
    num_reqs: int = 0
    num_sampled: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    gpu_forward_ms: Optional[float] = None  # device time between events around the forward
    gpu_sample_ms: Optional[float] = None  # ... from compute_logits to the sampler's end
    events: list[Any] = field(default_factory=list, repr=False)

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_reqs

    @property
    def wall_ms(self) -> float:
        return 1000.0 * self.seconds.get(STEP, 0.0)


class StepClock:
    """Times the pieces of every engine step of an `LLM` whose model runner lives in this
    process (uniproc executor). Pieces the engine no longer has are skipped and listed in
    `skipped`; `finish()` reads the device events once the run is over.

    `on_step_start(index)` / `on_step_end(index)` are called around each step (the profiler
    window hooks in there); they may raise to stop the run.
    """

    def __init__(self, llm: Any, platform: Any) -> None:
        core = llm.core
        executor = getattr(core, "executor", None) if core is not None else None
        runner = getattr(executor, "runner", None)
        if runner is None:
            raise ValueError("profile_throughput needs the model runner in this process: one "
                             "device, --distributed-executor-backend uniproc, no data "
                             "parallelism.")
        self.llm, self.core, self.runner, self.platform = llm, core, runner, platform
        self.steps: list[StepRecord] = []
        self.loop_seconds: dict[str, float] = {}  # pieces timed outside core.step
        self.skipped: list[str] = []
        self.on_step_start: Callable[[int], None] = lambda index: None
        self.on_step_end: Callable[[int], None] = lambda index: None
        self._installed: list[tuple[Any, str, Any]] = []
        self._current: Optional[StepRecord] = None
        self._active: set[str] = set()

    # ---- install / uninstall ----
    def install(self) -> None:
        core, runner = self.core, self.runner
        self._wrap(core, "step", self._step, required=True)
        self._wrap(core.scheduler, "schedule", self._timed(SCHEDULE, self._note_schedule),
                   required=True)
        self._wrap(core.scheduler, "update_from_output", self._timed(UPDATE), required=True)
        self._wrap(self.llm.output_processor, "process_outputs", self._timed(OUTPUTS),
                   required=True)
        self._wrap(core.executor, "execute_model", self._timed(EXECUTE))
        self._wrap(core.executor, "execute_model_async",
                   self._timed(EXECUTE, self._note_handle))
        self._wrap(runner.input_batch, "update", self._timed(UPDATE_BATCH))
        self._wrap(runner.input_batch, "prepare", self._timed(PREPARE, self._note_prepare))
        self._wrap(runner.attn_backend, "build_metadata", self._timed(METADATA))
        self._wrap(runner, "forward", self._timed(FORWARD, events="both"))
        self._wrap(runner, "_sample", self._timed(SAMPLE))
        self._wrap(runner.model, "compute_logits", self._timed(LOGITS, events="start"))
        self._wrap(runner, "sampler", self._timed(SAMPLER, events="end"))

    def uninstall(self) -> None:
        for obj, name, original in reversed(self._installed):
            if original is None:  # a class method: drop the instance attribute
                delattr(obj, name)
            else:  # an instance attribute (the graph runner, the sampler): put it back
                setattr(obj, name, original)
        self._installed.clear()

    def _wrap(self, obj: Any, name: str, make: Callable[[Callable], Callable],
              required: bool = False) -> None:
        original = getattr(obj, name, None)
        if original is None:
            if required:
                raise RuntimeError(f"{type(obj).__name__} has no '{name}' to time; the engine "
                                   "changed under profile_throughput.py: update its probes.")
            self.skipped.append(f"{type(obj).__name__}.{name}")
            return
        own = name in vars(obj)
        setattr(obj, name, make(original))
        self._installed.append((obj, name, original if own else None))

    # ---- wrappers ----
    def _timed(self, piece: str, note: Optional[Callable] = None,
               events: Optional[str] = None) -> Callable[[Callable], Callable]:
        def make(fn: Callable) -> Callable:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if piece in self._active:  # nested call of the same piece: count it once
                    return fn(*args, **kwargs)
                record = self._current
                if record is not None and events in ("both", "start"):
                    record.events.append((piece, "start", self._record_event()))
                self._active.add(piece)
                t0 = time.perf_counter()
                try:
                    with record_function(piece.strip()):
                        result = fn(*args, **kwargs)
                finally:
                    seconds = time.perf_counter() - t0
                    self._active.discard(piece)
                    book = self.loop_seconds if record is None else record.seconds
                    book[piece] = book.get(piece, 0.0) + seconds
                if record is not None and events in ("both", "end"):
                    record.events.append((piece, "end", self._record_event()))
                if note is not None and record is not None:
                    note(record, args, result)
                return result
            return wrapper
        return make

    def _step(self, fn: Callable) -> Callable:
        def wrapper() -> Any:
            index = len(self.steps)
            self.on_step_start(index)
            record = StepRecord()
            self._current = record
            t0 = time.perf_counter()
            try:
                result = fn()
            finally:
                record.seconds[STEP] = time.perf_counter() - t0
                self._current = None
                self.steps.append(record)
            self.on_step_end(index)
            return result
        return wrapper

    def _record_event(self) -> Any:
        event = self.platform.create_event()
        event.record()
        return event

    @staticmethod
    def _note_schedule(record: StepRecord, args: tuple, out: Any) -> None:
        record.num_tokens += int(out.total_num_scheduled_tokens)
        record.num_reqs += len(out.num_scheduled_tokens)

    @staticmethod
    def _note_prepare(record: StepRecord, args: tuple, inputs: Any) -> None:
        record.num_sampled += len(inputs.sample_req_idx)

    def _note_handle(self, record: StepRecord, args: tuple, handle: Any) -> None:
        """Time the handle's `result()` (the wait) wherever the core calls it."""
        result = getattr(handle, "result", None)
        if result is None:
            return
        try:
            handle.result = self._timed(RESULT)(result)
        except AttributeError:  # __slots__: the wait stays inside "step rest"
            pass

    def finish(self) -> None:
        """Device time per step from its events. Call after the run, when the device has
        passed every event, so reading them waits for nothing and changes no overlap."""
        self.platform.synchronize()
        for record in self.steps:
            marks = {(piece, kind): ev for piece, kind, ev in record.events}
            pairs = ((FORWARD, FORWARD, "gpu_forward_ms"), (LOGITS, SAMPLER, "gpu_sample_ms"))
            for start_piece, end_piece, attr in pairs:
                start, end = marks.get((start_piece, "start")), marks.get((end_piece, "end"))
                if start is not None and end is not None:
                    setattr(record, attr, start.elapsed_ms(end))
            record.events = []

    # ---- results ----
    def piece_seconds(self, run_seconds: float) -> dict[str, float]:
        """Total seconds per piece over every step of a run that took `run_seconds`, the
        derived pieces included (LOOP_REST: the run's time outside steps and outputs)."""
        totals = {p: 0.0 for p in PIECE_ORDER}
        for s in self.steps:
            for piece, seconds in s.seconds.items():
                totals[piece] += seconds
        for piece, seconds in self.loop_seconds.items():
            totals[piece] += seconds
        for derived, (parent, children) in _DERIVED.items():
            totals[derived] = totals[parent] - sum(totals[c] for c in children)
        totals[LOOP_REST] = run_seconds - totals[STEP] - totals[OUTPUTS]
        return totals
