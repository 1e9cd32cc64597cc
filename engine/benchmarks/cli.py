"""`engine bench {latency,throughput,serve}`: benchmarks that print a table with their peers."""

from __future__ import annotations

import argparse
import importlib

_BENCHMARKS = {
    "latency": ("engine.benchmarks.latency", "Time per output token vs the bandwidth roofline."),
    "throughput": ("engine.benchmarks.throughput", "Offline throughput vs HF transformers."),
    "serve": ("engine.benchmarks.serve", "Load a running server; TTFT/TPOT/ITL percentiles."),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="Run a benchmark and print a table.")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    for name, (module_name, help_text) in _BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        parser = kinds.add_parser(name, help=help_text)
        module.add_cli_args(parser)
        parser.set_defaults(func=module.main)
