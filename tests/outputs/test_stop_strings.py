"""Stop strings: across token borders, truncation, include_stop_str_in_output, hold-back."""

from engine.messages.core import EngineCoreOutput, EngineCoreOutputs
from engine.outputs.output_processor import OutputProcessor
from engine.outputs.stop_checker import StopChecker
from engine.sampling_params import RequestOutputKind, SamplingParams


def step(request_id, ids, **kwargs):
    return EngineCoreOutputs(
        outputs=[EngineCoreOutput(request_id=request_id, new_token_ids=ids, **kwargs)],
        timestamp=1.0,
    )


def char_tokens(tokenizer, text):
    """One token per character-ish piece, so stop strings span several tokens."""
    ids = []
    for ch in text:
        ids.extend(tokenizer.encode(ch, add_special_tokens=False))
    return ids


def test_checker_finds_earliest_match_spanning_the_border():
    checker = StopChecker(["cd", "bc"], include_stop_str_in_output=False)
    assert checker.find("ab", 2) is None
    match = checker.find("abcd", 2)  # "bc" spans the old/new border and starts first
    assert (match.stop_string, match.text_length) == ("bc", 1)
    included = StopChecker(["bc"], include_stop_str_in_output=True).find("abcd", 2)
    assert included.text_length == 3


def test_checker_holds_back_possible_stop_prefixes():
    checker = StopChecker(["STOP", "xy"], include_stop_str_in_output=False)
    assert checker.num_held_back("hello ST") == 2
    assert checker.num_held_back("hello x") == 1
    assert checker.num_held_back("hello") == 0
    assert StopChecker(["STOP"], True).num_held_back("hello ST") == 0


def run_stream(tokenizer, text, params, request_id="r"):
    processor = OutputProcessor(tokenizer)
    processor.add_request(request_id, "p", [1, 2], params, arrival_time=0.0, priority=0)
    outputs, aborts = [], []
    for token_id in char_tokens(tokenizer, text):
        outs, abort_ids = processor.process_outputs(step(request_id, [token_id]))
        outputs.extend(outs)
        aborts.extend(abort_ids)
    return processor, outputs, aborts


def test_stop_string_across_tokens_truncates_and_aborts(tokenizer):
    params = SamplingParams(stop=["END!"], max_tokens=100)
    processor, outputs, aborts = run_stream(tokenizer, "Hello world END! more text", params)
    final = outputs[-1]
    assert final.finished
    assert final.outputs[0].text == "Hello world "
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == "END!"
    assert aborts == ["r"]
    # Tokens after the stop string never reach the user.
    assert all(not o.outputs[0].text.endswith("more") for o in outputs)
    assert not processor.has_unfinished_requests()


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop=["END!"], include_stop_str_in_output=True, max_tokens=100)
    _, outputs, _ = run_stream(tokenizer, "Hello END! more", params)
    assert outputs[-1].outputs[0].text == "Hello END!"


def test_delta_streaming_never_shows_part_of_a_stop_string(tokenizer):
    params = SamplingParams(stop=["STOP"], max_tokens=100, output_kind=RequestOutputKind.DELTA)
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    streamed, aborts = "", []
    for piece in ["one ", "ST", " two ", "STO", " three ", "ST", "OP", " four"]:
        outs, abort_ids = processor.process_outputs(step("r", char_tokens(tokenizer, piece)))
        aborts.extend(abort_ids)
        streamed += "".join(o.outputs[0].text for o in outs)
        if piece in ("ST", "STO"):
            # A possible start of "STOP" is held back, not streamed.
            assert not streamed.endswith(piece) and streamed.endswith(" ")
    assert streamed == "one ST two STO three "
    assert aborts == ["r"]


def test_stop_string_in_the_middle_of_a_multi_token_step(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["."], max_tokens=100)
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    ids = tokenizer.encode("Yes. No way", add_special_tokens=False)
    outs, aborts = processor.process_outputs(step("r", ids))
    completion = outs[0].outputs[0]
    assert completion.text == "Yes"
    # The tokens after the one that completed the stop string are dropped.
    assert completion.token_ids == tokenizer.encode("Yes.", add_special_tokens=False)
    assert aborts == ["r"]


def test_min_tokens_holds_off_stop_strings(tokenizer):
    params = SamplingParams(stop=["a"], min_tokens=3, max_tokens=100)
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], params, arrival_time=0.0)
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    b = tokenizer.encode("b", add_special_tokens=False)[0]
    outs, aborts = processor.process_outputs(step("r", [a, b, b]))
    assert not outs[0].finished and aborts == []
    outs, aborts = processor.process_outputs(step("r", [a]))
    assert outs[0].finished and outs[0].outputs[0].text == "abb"
