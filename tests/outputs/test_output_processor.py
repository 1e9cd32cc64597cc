"""OutputProcessor: n > 1 aggregation, output kinds, logprobs, abort, no leaks."""

import math

import pytest

from engine.messages.core import (
    EngineCoreOutput,
    EngineCoreOutputs,
    FinishReason,
    LogprobsEntry,
)
from engine.outputs.output_processor import OutputProcessor
from engine.sampling_params import RequestOutputKind, SamplingParams


def batch(*outputs, timestamp=0.0):
    return EngineCoreOutputs(outputs=list(outputs), timestamp=timestamp)


def out(request_id, ids, **kwargs):
    return EngineCoreOutput(request_id=request_id, new_token_ids=ids, **kwargs)


@pytest.fixture
def words(tokenizer):
    return {w: tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Hi", " there", "!")}


def assert_empty(processor):
    assert not processor.has_unfinished_requests()
    assert processor.get_num_unfinished_requests() == 0
    assert processor._parents == {} and processor._children == {}
    assert processor._aborted_outputs == []


def test_n_children_get_distinct_seeds_and_one_request_output(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, seed=7, max_tokens=2)
    core = processor.add_request(
        "req", "Say hi", [5, 6], params, arrival_time=1.0, priority=2, eos_token_id=2
    )
    assert [r.request_id for r in core] == ["0_req", "1_req", "2_req"]
    assert [r.sampling_params.seed for r in core] == [7, 8, 9]
    assert all(r.sampling_params.n == 1 and r.prompt_token_ids == [5, 6] for r in core)
    assert all(r.priority == 2 and r.eos_token_id == 2 for r in core)
    assert processor.get_num_unfinished_requests() == 1

    outs, _ = processor.process_outputs(
        batch(out("0_req", [words["Hi"]]), out("2_req", [words["!"]]))
    )
    assert len(outs) == 1 and not outs[0].finished
    assert [c.index for c in outs[0].outputs] == [0, 2]  # CUMULATIVE: children with tokens
    length = FinishReason.LENGTH
    outs, _ = processor.process_outputs(
        batch(
            out("0_req", [words[" there"]], finish_reason=length),
            out("1_req", [words["Hi"], words["!"]], finish_reason=length),
            out("2_req", [words["!"]], finish_reason=length),
        )
    )
    final = outs[0]
    assert final.finished and final.request_id == "req" and final.prompt == "Say hi"
    assert [c.text for c in final.outputs] == ["Hi there", "Hi!", "!!"]
    assert all(c.finish_reason == "length" for c in final.outputs)
    assert final.metrics.num_generation_tokens == 6
    assert_empty(processor)


def test_unseeded_children_stay_unseeded(tokenizer):
    processor = OutputProcessor(tokenizer)
    core = processor.add_request("r", None, [1], SamplingParams(n=2), arrival_time=0.0)
    assert [r.sampling_params.seed for r in core] == [None, None]


def feed_three_steps(tokenizer, words, kind):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(output_kind=kind), arrival_time=0.0)
    results = []
    for ids, reason in (
        ([words["Hi"]], None),
        ([words[" there"]], None),
        ([words["!"]], FinishReason.LENGTH),
    ):
        outs, _ = processor.process_outputs(batch(out("r", ids, finish_reason=reason)))
        results.append(outs)
    assert_empty(processor)
    return results


def test_cumulative_delta_final_only(tokenizer, words):
    cumulative = feed_three_steps(tokenizer, words, RequestOutputKind.CUMULATIVE)
    assert [o[0].outputs[0].text for o in cumulative] == ["Hi", "Hi there", "Hi there!"]
    assert [len(o[0].outputs[0].token_ids) for o in cumulative] == [1, 2, 3]
    delta = feed_three_steps(tokenizer, words, RequestOutputKind.DELTA)
    assert [o[0].outputs[0].text for o in delta] == ["Hi", " there", "!"]
    assert [o[0].outputs[0].token_ids for o in delta] == [
        [words["Hi"]],
        [words[" there"]],
        [words["!"]],
    ]
    assert [o[0].finished for o in delta] == [False, False, True]
    final_only = feed_three_steps(tokenizer, words, RequestOutputKind.FINAL_ONLY)
    assert [len(o) for o in final_only] == [0, 0, 1]
    assert final_only[2][0].outputs[0].text == "Hi there!"


def test_final_only_with_n_waits_for_all_children(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, output_kind=RequestOutputKind.FINAL_ONLY)
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    outs, _ = processor.process_outputs(
        batch(out("0_r", [words["Hi"]], finish_reason=FinishReason.STOP))
    )
    assert outs == []
    outs, _ = processor.process_outputs(
        batch(out("1_r", [words["!"]], finish_reason=FinishReason.LENGTH))
    )
    assert [(c.index, c.finish_reason) for c in outs[0].outputs] == [(0, "stop"), (1, "length")]
    assert_empty(processor)


def test_stop_token_text_is_dropped_but_token_kept(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop_token_ids=[words["!"]])
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    outs, aborts = processor.process_outputs(
        batch(
            out(
                "r",
                [words["Hi"], words["!"]],
                finish_reason=FinishReason.STOP,
                stop_reason=words["!"],
            )
        )
    )
    completion = outs[0].outputs[0]
    assert completion.text == "Hi" and completion.token_ids == [words["Hi"], words["!"]]
    assert completion.finish_reason == "stop" and completion.stop_reason == words["!"]
    assert aborts == []  # the core finished it itself


def test_logprobs_conversion_and_cumulative_logprob(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(logprobs=2), arrival_time=0.0)
    first = LogprobsEntry(
        token_ids=[words["Hi"], words["!"], words["Hi"]], logprobs=[-0.5, -0.1, -0.5], rank=2
    )
    second = LogprobsEntry(
        token_ids=[words[" there"], words[" there"], words["Hi"]],
        logprobs=[-0.25, -0.25, -3.0],
        rank=1,
    )
    outs, _ = processor.process_outputs(
        batch(out("r", [words["Hi"], words[" there"]], new_logprobs=[first, second]))
    )
    completion = outs[0].outputs[0]
    assert math.isclose(completion.cumulative_logprob, -0.75)
    position = completion.logprobs[0]
    assert set(position) == {words["Hi"], words["!"]}
    assert position[words["Hi"]].rank == 2 and position[words["Hi"]].logprob == -0.5
    assert position[words["!"]].rank == 1 and position[words["!"]].decoded_token == "!"
    assert completion.logprobs[1][words[" there"]].decoded_token == " there"
    assert completion.logprobs[1][words["Hi"]].rank == 2


def test_no_logprobs_requested_means_none(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(), arrival_time=0.0)
    outs, _ = processor.process_outputs(batch(out("r", [words["Hi"]])))
    assert outs[0].outputs[0].logprobs is None
    assert outs[0].outputs[0].cumulative_logprob is None
    assert outs[0].prompt_logprobs is None


def entry(token_id, logprob):
    return LogprobsEntry(token_ids=[token_id], logprobs=[logprob], rank=1)


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_prompt_logprobs_accumulate_over_chunks(tokenizer, words, kind):
    processor = OutputProcessor(tokenizer)
    prompt = [10, 11, 12, 13]
    params = SamplingParams(prompt_logprobs=0, output_kind=kind)
    processor.add_request("r", None, prompt, params, arrival_time=0.0)
    # Chunked prefill: two steps of prompt logprobs, no token yet -> nothing to hand out.
    outs, _ = processor.process_outputs(batch(out("r", [], new_prompt_logprobs=[entry(11, -1.0)])))
    assert outs == []
    outs, _ = processor.process_outputs(
        batch(out("r", [words["Hi"]], new_prompt_logprobs=[entry(12, -2.0), entry(13, -3.0)]))
    )
    prompt_logprobs = outs[0].prompt_logprobs
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt)
    assert [p[t].logprob for p, t in zip(prompt_logprobs[1:], prompt[1:], strict=True)] == [
        -1.0,
        -2.0,
        -3.0,
    ]
    outs, _ = processor.process_outputs(batch(out("r", [words["!"]])))
    if kind == RequestOutputKind.DELTA:
        assert outs[0].prompt_logprobs is None  # sent once, with the first output
    else:
        assert outs[0].prompt_logprobs == prompt_logprobs


def test_abort_returns_child_ids_and_final_output(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(n=2), arrival_time=0.0)
    processor.process_outputs(batch(out("0_r", [words["Hi"]], finish_reason=FinishReason.STOP)))
    assert processor.abort_request("r") == ["1_r"]  # child 0 already finished
    assert processor.abort_request("r") == [] and processor.abort_request("nope") == []
    # Late outputs for the aborted child are ignored; the abort's final output comes now.
    outs, _ = processor.process_outputs(batch(out("1_r", [words["!"]])))
    assert len(outs) == 1 and outs[0].finished
    assert [c.finish_reason for c in outs[0].outputs] == ["stop", "abort"]
    assert_empty(processor)


def test_metrics_and_cached_tokens(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1, 2, 3], SamplingParams(), arrival_time=10.0)
    processor.process_outputs(batch(out("r", [words["Hi"]], num_cached_tokens=2), timestamp=10.5))
    outs, _ = processor.process_outputs(
        batch(out("r", [words["!"]], finish_reason=FinishReason.LENGTH), timestamp=11.0)
    )
    metrics = outs[0].metrics
    assert metrics.first_token_time == 10.5 and metrics.last_token_time == 11.0
    assert metrics.time_to_first_token == 0.5 and metrics.e2e_latency == 1.0
    assert metrics.num_generation_tokens == 2
    assert outs[0].num_cached_tokens == 2


def test_duplicate_request_id_is_refused(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(), arrival_time=0.0)
    with pytest.raises(ValueError, match="'r'.*unique request_id"):
        processor.add_request("r", None, [1], SamplingParams(), arrival_time=0.0)


def test_detokenize_false_gives_ids_only(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(detokenize=False, logprobs=0)
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    outs, _ = processor.process_outputs(
        batch(
            out(
                "r",
                [words["Hi"]],
                new_logprobs=[entry(words["Hi"], -0.1)],
                finish_reason=FinishReason.LENGTH,
            )
        )
    )
    completion = outs[0].outputs[0]
    assert completion.text == "" and completion.token_ids == [words["Hi"]]
    assert completion.logprobs[0][words["Hi"]].decoded_token is None


def test_many_requests_leave_nothing_behind(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    for i in range(20):
        params = SamplingParams(n=1 + i % 3, stop=["!"] if i % 2 else None)
        processor.add_request(f"r{i}", None, [1], params, arrival_time=0.0)
    core_ids = list(processor._children)
    outs, aborts = processor.process_outputs(
        batch(*[out(c, [words["Hi"], words["!"]]) for c in core_ids])
    )
    assert len(aborts) == sum(1 + i % 3 for i in range(20) if i % 2)
    processor.process_outputs(
        batch(*[out(c, [words["Hi"]], finish_reason=FinishReason.LENGTH) for c in core_ids])
    )
    assert_empty(processor)


def test_only_the_first_child_computes_prompt_logprobs(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, prompt_logprobs=1)
    core = processor.add_request("r", None, [1, 2], params, arrival_time=0.0)
    assert [r.sampling_params.prompt_logprobs for r in core] == [1, None, None]


def test_delta_stream_of_emojis_never_splits_a_character(tokenizer):
    text = "🎉 你好 👩‍👩‍👧!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(output_kind=RequestOutputKind.DELTA, max_tokens=len(ids))
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    deltas = []
    for i, token_id in enumerate(ids):
        reason = FinishReason.LENGTH if i == len(ids) - 1 else None
        outs, _ = processor.process_outputs(batch(out("r", [token_id], finish_reason=reason)))
        deltas.extend(o.outputs[0].text for o in outs)
    assert len(deltas) == len(ids)  # one output per token, some with empty text
    assert "" in deltas and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_an_engine_error_finishes_the_completion_with_its_message(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("req", "x", [5], SamplingParams(max_tokens=4), arrival_time=0.0)
    processor.process_outputs(batch(out("req", [words["Hi"]])))
    outs, to_abort = processor.process_outputs(
        batch(out("req", [], finish_reason=FinishReason.ERROR, error="ValueError: boom")))
    assert to_abort == [] and outs[0].finished
    completion = outs[0].outputs[0]
    assert completion.finish_reason == "error" and completion.error == "ValueError: boom"
    assert completion.text == "Hi"
    assert_empty(processor)


def test_a_client_side_failure_fails_that_request_and_aborts_it_in_the_core(tokenizer, words):
    processor = OutputProcessor(tokenizer)
    processor.add_request("ok", "x", [5], SamplingParams(max_tokens=4), arrival_time=0.0)
    processor.add_request("boom", "x", [5], SamplingParams(max_tokens=4), arrival_time=0.0)
    # An id the tokenizer cannot decode (a model whose vocabulary is larger than it).
    outs, to_abort = processor.process_outputs(
        batch(out("ok", [words["Hi"]]), out("boom", [10**12])))
    assert to_abort == ["boom"]
    by_id = {o.request_id: o for o in outs}
    assert not by_id["ok"].finished and by_id["ok"].outputs[0].text == "Hi"
    failed = by_id["boom"].outputs[0]
    assert by_id["boom"].finished and failed.finish_reason == "error" and failed.error
