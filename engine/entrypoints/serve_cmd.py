"""`engine serve MODEL`: the OpenAI-compatible server, engine core in its own process.

Rule: startup is a timed checklist (start the core process -> resolve the config and load
the tokenizer here while the core loads the model -> core ready -> listen), and shutdown
always takes the core process down with the server: on SIGINT/SIGTERM (exit 0) and when
the core dies (exit 1, after a short grace period in which clients get 503s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Optional

logger = logging.getLogger(__name__)

# After the engine core dies, keep answering 503 this long before exiting.
_DEATH_GRACE_S = 2.0


def register(subparsers: Any) -> None:
    from engine.entrypoints.args import add_engine_args

    parser = subparsers.add_parser(
        "serve", help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /ready, "
        "/version, /metrics, /docs).",
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, GGUF file, or hub id of the model.")
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="The same as the positional MODEL (vLLM's spelling).")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000).")
    server.add_argument("--api-key", default=os.environ.get("ENGINE_API_KEY"),
                        help="Require 'Authorization: Bearer KEY' on every route that does "
                        "work or changes state (/v1/*, /tokenize, /detokenize, "
                        "/reset_prefix_cache); /health, /ready, /version, /metrics and the "
                        "API docs (/docs, /redoc, /openapi.json) stay open (default: "
                        "$ENGINE_API_KEY, unset = no auth).")
    server.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="Larger request bodies get 413 before they are read "
                        "(default: 4 MiB).")
    server.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="On SIGTERM/SIGINT new requests get 503 and requests in flight "
                        "get this many seconds to finish; the rest end with an error "
                        "(streams: an error event and [DONE]) (default: 5).")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="Model name(s) clients use; the first is reported in responses "
                        "(default: the MODEL argument).")
    server.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="Log level of the server and the engine core (default: info).")
    server.add_argument("--disable-log-stats", action="store_true",
                        help="Do not log the one-line throughput / queue / KV-cache stats "
                        "every --log-stats-interval seconds while requests run.")
    server.add_argument("--log-stats-interval", type=float, default=10.0,
                        help="Seconds between two stats lines (default: 10).")
    server.add_argument("--tool-call-parser", default=None, metavar="NAME",
                        help="Find tool calls in the model's output for tool_choice='auto' "
                        "(hermes: Qwen/Hermes <tool_call>; llama3_json: Llama 3.x; "
                        "mistral: [TOOL_CALLS]; or a plugin's from the engine.tool_parsers "
                        "entry points). Without it, 'auto' is refused with a 400; "
                        "'required' and named tool choices work either way.")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="Accepted for vLLM compatibility: tool_choice='auto' is on "
                        "whenever --tool-call-parser is given (which this flag needs).")
    lora = parser.add_argument_group("LoRA (with --enable-lora)")
    lora.add_argument("--lora-modules", nargs="+", action="extend", default=None,
                      metavar="NAME=PATH",
                      help="LoRA adapters (peft directories) to serve, each as name=path or "
                      "vLLM's JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": "
                      "...}'; a request with model=NAME runs with that adapter, and "
                      "/v1/models lists each with its parent model.")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      default=None,
                      help="Add POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                      "(behind --api-key); unloading lets running requests finish (default: "
                      "off, or on with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1).")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.entrypoints.args import engine_args_from_namespace

    if args.model is not None and args.model_option is not None \
            and args.model != args.model_option:
        print(f"error: MODEL given twice ({args.model!r} and --model {args.model_option!r}); "
              "pass one.", file=sys.stderr)
        return 2
    args.model = args.model or args.model_option
    if args.model is None:
        print("error: no model; pass MODEL or --model MODEL (an HF directory, a GGUF file or "
              "a hub id).", file=sys.stderr)
        return 2
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("error: --enable-auto-tool-choice needs --tool-call-parser NAME.",
              file=sys.stderr)
        return 2
    if args.tool_call_parser is not None:
        from engine.tool_parsers import get_tool_parser

        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    problem = _lora_flag_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not args.log_stats_interval > 0:
        print(f"error: --log-stats-interval must be > 0, got {args.log_stats_interval}.",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    from engine.engine_core.async_llm import AsyncLLM

    try:
        engine_args = engine_args_from_namespace(args, model=args.model)
        llm = AsyncLLM.start(engine_args, log_level=args.log_level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line first; the traceback only at debug level
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: the engine failed to start: {first} (rerun with --log-level debug "
              "for the traceback).", file=sys.stderr)
        logging.getLogger(__name__).debug("startup failure", exc_info=True)
        return 1
    try:
        loras = _lora_registry(args, llm)
    except ValueError as exc:
        llm.shutdown()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    timings = dict(llm.startup_timings)
    timings["total to ready"] = time.perf_counter() - t0
    return asyncio.run(_serve(args, llm, timings, loras))


def _lora_flag_problem(args: argparse.Namespace) -> Optional[str]:
    """Why the LoRA server flags cannot work as given (None: they can)."""
    from engine.entrypoints.lora_adapters import parse_lora_module
    from engine.entrypoints.openai.lora_routes import runtime_updating_from_env

    if args.allow_runtime_lora_updating is None:
        args.allow_runtime_lora_updating = runtime_updating_from_env()
    if not args.enable_lora:
        if args.lora_modules:
            return "--lora-modules needs --enable-lora."
        if args.allow_runtime_lora_updating:
            return "--allow-runtime-lora-updating needs --enable-lora."
        return None
    try:
        args.lora_modules = [parse_lora_module(m) for m in args.lora_modules or []]
    except ValueError as exc:
        return str(exc)
    return None


def _lora_registry(args: argparse.Namespace, llm: Any) -> Optional[Any]:
    """The adapters of --lora-modules, each checked (ValueError), ids from 1 in order."""
    if llm.config.lora is None:
        return None
    from engine.entrypoints.lora_adapters import AdapterChecker, LoRARegistry

    names = args.served_model_name or [args.model]
    registry = LoRARegistry(AdapterChecker(llm.config), names[0])
    for module in args.lora_modules:
        registry.add(module.name, module.path, module.base_model_name, reserved=names)
    return registry


def _print_startup(args: argparse.Namespace, timings: dict[str, float]) -> None:
    width = max(len(k) for k in timings)
    lines = [f"  {name:<{width}}  {seconds:6.2f} s" for name, seconds in timings.items()]
    print("Startup:\n" + "\n".join(lines), flush=True)
    print(f"Serving on http://{args.host}:{args.port} (docs at /docs)", flush=True)


async def _serve(args: argparse.Namespace, llm: Any, timings: dict[str, float],
                 loras: Optional[Any] = None) -> int:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from engine.entrypoints.openai.api_server import build_app
    from engine.entrypoints.openai.serving_common import ServerState
    from engine.metrics import EngineMetrics

    names = args.served_model_name or [args.model]
    registry = CollectorRegistry()
    llm.observers.append(EngineMetrics(registry, names[0]))
    if not args.disable_log_stats:
        from engine.stats_logger import StatsLogger

        llm.observers.append(StatsLogger(args.log_stats_interval))
    reasoning = None
    if llm.config.reasoning_parser is not None:
        from engine.reasoning import get_reasoning_parser

        reasoning = get_reasoning_parser(llm.config.reasoning_parser)
    state = ServerState(engine=llm, model_names=names, model_path=args.model,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=reasoning,
                        loras=loras)
    app = build_app(state, registry, api_key=args.api_key,
                    max_request_body_bytes=args.max_request_body_bytes,
                    allow_runtime_lora_updating=bool(args.allow_runtime_lora_updating))
    server = _server_class()(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.log_level == "debug", timeout_graceful_shutdown=2,
        lifespan="off",
    ))
    exit_code = 0
    loop = asyncio.get_running_loop()

    def on_core_death() -> None:
        nonlocal exit_code
        exit_code = 1
        print("error: the engine core process died; shutting down.", file=sys.stderr,
              flush=True)
        loop.call_later(_DEATH_GRACE_S, server.request_exit)

    async def drain() -> None:
        from engine.entrypoints.openai.errors import ServerDrainingError

        state.draining = True
        state.ready = False
        deadline = loop.time() + args.shutdown_timeout
        while llm.num_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if llm.num_requests:
            logger.warning("Shutdown: ending %d requests still running after "
                           "--shutdown-timeout=%s s.", llm.num_requests, args.shutdown_timeout)
            llm.fail_all(ServerDrainingError("The server is shutting down; the request was "
                                             "stopped (--shutdown-timeout)."))
            flush_deadline = loop.time() + 2.0
            while llm.num_requests and loop.time() < flush_deadline:
                await asyncio.sleep(0.02)
        server.request_exit()

    server.on_first_signal = lambda: loop.call_soon_threadsafe(
        lambda: asyncio.ensure_future(drain()))
    llm.begin(on_death=on_core_death)
    try:
        started = asyncio.create_task(server.serve())
        while not server.started and not started.done():
            await asyncio.sleep(0.01)
        if server.started:
            _print_startup(args, timings)
        await started
    finally:
        state.ready = False
        llm.shutdown()
    if not server.started:
        return 1
    return exit_code


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but SIGINT/SIGTERM end it with exit code 0 instead of re-raising the
        signal after shutdown (which would kill the process before the core is stopped)."""

        on_first_signal: Optional[Any] = None
        _draining = False

        def handle_exit(self, sig: int, frame: Optional[Any]) -> None:
            if self._draining or self.on_first_signal is None:  # a second signal: now
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True
                return
            self._draining = True  # drain first (see _serve), then exit
            self.on_first_signal()

        def request_exit(self) -> None:
            self.should_exit = True

    return Server
