"""InputProcessor: tokenization, validation messages (numbers + flag), defaults, chat template."""

import pytest

from engine.inputs import InputProcessor
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer  # the real SmolLM2 tokenizer, loaded once (tests/conftest.py)


@pytest.fixture
def processor(tokenizer):
    return InputProcessor(tokenizer, max_model_len=32, max_logprobs=5)


def test_string_prompt_is_tokenized_as_the_tokenizer_does(processor, tokenizer):
    text, ids, params = processor.process("Hello world", SamplingParams(max_tokens=4))
    assert text == "Hello world"
    assert ids == tokenizer.encode("Hello world")  # special tokens as the tokenizer adds them
    assert params.max_tokens == 4


def test_token_prompt_passes_through(processor):
    text, ids, params = processor.process([5, 6, 7], SamplingParams(max_tokens=None))
    assert text is None and ids == [5, 6, 7]
    assert params.max_tokens == 32 - 3  # None -> what is left of max_model_len


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(processor, prompt):
    with pytest.raises(ValueError, match="at least one token"):
        processor.process(prompt, SamplingParams())


def test_token_id_out_of_range(processor, tokenizer):
    vocab = len(tokenizer)
    with pytest.raises(ValueError, match=rf"{vocab}.*position 1.*{vocab} tokens"):
        processor.process([1, vocab], SamplingParams())
    with pytest.raises(ValueError, match="-1"):
        processor.process([-1], SamplingParams())


def test_vocab_size_override_allows_padded_embeddings(tokenizer):
    vocab = len(tokenizer)
    processor = InputProcessor(tokenizer, 32, 5, vocab_size=vocab + 64)
    assert processor.process([vocab + 1], SamplingParams(max_tokens=1))[1] == [vocab + 1]


def test_prompt_too_long(processor):
    with pytest.raises(ValueError, match=r"32 tokens.*max_model_len is 32.*--max-model-len"):
        processor.process(list(range(1, 33)), SamplingParams())


def test_prompt_plus_max_tokens_too_long(processor):
    with pytest.raises(
        ValueError,
        match=r"prompt has 20 tokens and max_tokens is 16: 36 tokens exceed max_model_len 32; "
        r"lower max_tokens to at most 12 or raise --max-model-len",
    ):
        processor.process(list(range(1, 21)), SamplingParams(max_tokens=16))


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_too_many_logprobs(processor, field):
    with pytest.raises(ValueError, match=rf"{field} is 6 .*at most 5.*--max-logprobs 6"):
        processor.process([1, 2], SamplingParams(max_tokens=2, **{field: 6}))
    assert processor.process([1, 2], SamplingParams(max_tokens=2, **{field: 5}))


def test_stop_strings_need_detokenize(processor):
    with pytest.raises(ValueError, match="detokenize=True"):
        processor.process([1], SamplingParams(stop=["x"], detokenize=False))


def test_default_sampling_params_from_generation_config(tokenizer):
    defaults = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 50,
        "max_new_tokens": 7,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "bos_token_id": 1,
    }
    processor = InputProcessor(tokenizer, 32, 5, generation_defaults=defaults)
    params = processor.default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.9, 50)
    assert params.max_tokens == 7 and params.repetition_penalty == 1.1
    # User-given params are never touched by the defaults.
    _, _, given = processor.process([1], SamplingParams(temperature=1.0, max_tokens=2))
    assert given.temperature == 1.0
    assert InputProcessor(tokenizer, 32, 5).default_sampling_params() == SamplingParams()


def test_chat_template_of_the_model(processor):
    messages = [{"role": "user", "content": "hi"}]
    rendered = processor.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_chat_template_override_text_and_file(tokenizer, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    from_text = InputProcessor(tokenizer, 32, 5, chat_template=template)
    assert from_text.apply_chat_template(messages) == "[user] hi\n"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    from_file = InputProcessor(tokenizer, 32, 5, chat_template=str(path))
    assert from_file.apply_chat_template(messages) == "[user] hi\n"
    with pytest.raises(ValueError, match="--chat-template 'no/such/file'"):
        InputProcessor(tokenizer, 32, 5, chat_template="no/such/file")


def test_chat_template_kwargs_and_continue_final_message(tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!{% endif %}"
    processor = InputProcessor(tokenizer, 32, 5, chat_template=template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert (
        processor.apply_chat_template(
            messages, add_generation_prompt=False, chat_template_kwargs={"shout": True}
        )
        == "hiyo!"
    )
    assert (
        processor.apply_chat_template(
            messages, add_generation_prompt=False, continue_final_message=True
        )
        == "hiyo"
    )
    with pytest.raises(ValueError, match="add_generation_prompt=false"):
        processor.apply_chat_template(messages, continue_final_message=True)


def test_missing_chat_template_says_which_flag(tokenizer):
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        processor = InputProcessor(tokenizer, 32, 5)
        with pytest.raises(ValueError, match="no chat template.*--chat-template"):
            processor.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template
