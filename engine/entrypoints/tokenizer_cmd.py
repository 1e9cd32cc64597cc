"""`engine tokenizer export MODEL DIR`: write the model's HF tokenizer to a directory.

Rule: the tokenizer written is exactly the one the server uses (GGUF files included, with
`--chat-template` applied), so client tools that count tokens or template chats (lm-eval,
guidellm, the openai SDK's token counting) agree with the server: point their tokenizer
option at DIR.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tokenizer", help="Tokenizer tools (export the server's tokenizer for client tools).")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    export = actions.add_parser(
        "export", help="Write MODEL's tokenizer (tokenizer.json, its config and chat "
                       "template) to DIR, as `engine serve MODEL` would use it.")
    export.add_argument("model", help="Model directory, .gguf file or hub id (as for serve).")
    export.add_argument("directory", help="Where to write the tokenizer files.")
    export.add_argument("--tokenizer", default=None,
                        help="Tokenizer to use instead of the model's (as for serve).")
    export.add_argument("--revision", default=None)
    export.add_argument("--trust-remote-code", action="store_true")
    export.add_argument("--chat-template", default=None,
                        help="A Jinja chat template or a file holding one (as for serve).")
    export.set_defaults(func=run)
    parser.set_defaults(func=lambda _: parser.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    from engine.engine_args import EngineArgs
    from engine.tokenizer import load_tokenizer

    engine_args = EngineArgs(model=args.model, tokenizer=args.tokenizer,
                             revision=args.revision, trust_remote_code=args.trust_remote_code,
                             chat_template=args.chat_template)
    try:
        model_config = engine_args.create_config().model
    except (ValueError, OSError) as exc:
        print(f"error: cannot resolve {args.model!r}: {exc}")
        return 1
    tokenizer = load_tokenizer(model_config)
    if os.path.exists(args.directory) and os.listdir(args.directory):
        print(f"error: {args.directory} exists and is not empty; pick a new directory.")
        return 1
    files = tokenizer.save_pretrained(args.directory)
    print(f"wrote the tokenizer of {args.model} ({len(tokenizer)} tokens) to "
          f"{args.directory}: {', '.join(sorted(os.path.basename(f) for f in files))}")
    return 0
