"""`engine generate MODEL --prompt ...` and `engine chat MODEL`: quick looks at a model."""

from __future__ import annotations

import argparse

from engine.entrypoints.args import add_engine_args, engine_args_from_namespace


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="Complete prompts and print the text.")
    gen.add_argument("model")
    gen.add_argument("--prompt", action="append", required=True, help="Repeat for a batch.")
    _sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    chat = subparsers.add_parser("chat", help="One chat turn (or an interactive chat).")
    chat.add_argument("model")
    chat.add_argument("--message", default=None, help="Ask once and exit; else interactive.")
    _sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=_chat)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sampling-seed", type=int, default=None)


def _make(args: argparse.Namespace):
    from engine import LLM, SamplingParams

    llm = LLM(**engine_args_from_namespace(args, model=args.model).model_dump())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    return llm, params


def _generate(args: argparse.Namespace) -> int:
    llm, params = _make(args)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    llm, params = _make(args)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = args.message if args.message is not None else input("> ")
        except EOFError:  # Ctrl-D ends an interactive chat
            return 0
        history.append({"role": "user", "content": text})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        print(reply)
        history.append({"role": "assistant", "content": reply})
        if args.message is not None:
            return 0
