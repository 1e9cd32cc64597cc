"""`engine bench`: latency, throughput and serving benchmarks, peers in the same run."""

from __future__ import annotations


def print_columns(rows: list[list[str]]) -> None:
    """Rows (the header first) as right-aligned columns two spaces apart."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
