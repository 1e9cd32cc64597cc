"""The core package `engine/` never names hardware: no torch.cuda, no vendor imports.

Rule: hardware questions go through `platforms/`. Comments and docstrings may mention
hardware (to explain why); code lines may not. The scanner is tested on planted files so
this test can fail.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ENGINE_ROOT = Path(__file__).resolve().parents[1] / "engine"

HARDWARE_NAMES = re.compile(
    r"torch\.cuda|is_cuda\(|torch_npu|torch_xla|habana|import triton|from triton\b|\.cuda\("
    # Identity checks: a branch on which device this is, instead of asking a capability.
    r"|\bdevice_type\s*[!=]=|[!=]=\s*[\w.]*\bdevice_type\b|\.device\.type\s*[!=]="
    r"|\bdevice_type\s+(?:not\s+)?in\b"
)


def _docstring_lines(source: str) -> set[int]:
    """Line numbers taken by module, class and function docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_lines(source: str) -> dict[int, str]:
    """Each line of Python source without its comment, docstring lines dropped."""
    lines = dict(enumerate(source.splitlines(), start=1))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row] = lines[row][:col]
    for row in _docstring_lines(source):
        lines.pop(row, None)
    return lines


def find_hardware_names(root: Path) -> list[str]:
    """`path:line: text` for every code line under `root` that names hardware."""
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = _code_lines(text) if path.suffix == ".py" else dict(
            enumerate(text.splitlines(), start=1)
        )
        for row, line in lines.items():
            if HARDWARE_NAMES.search(line):
                hits.append(f"{path}:{row}: {line.strip()}")
    return hits


def test_engine_names_no_hardware():
    hits = find_hardware_names(ENGINE_ROOT)
    assert not hits, "hardware named in engine/ (ask the platform instead):\n" + "\n".join(hits)


def test_scanner_finds_planted_names(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text(
        '"""Docstring may say torch.cuda."""\n'
        "import torch  # torch.cuda in a comment is fine\n"
        "x = torch.cuda.is_available()\n"
        "def f(t):\n"
        '    """Nor here: .cuda( in a docstring."""\n'
        "    return t.cuda()\n"
        "import triton\n"
        "mod = __import__('torch_npu')\n"
    )
    hits = find_hardware_names(tmp_path)
    assert [h.split(":")[1] for h in hits] == ["3", "6", "7", "8"]


def test_scanner_finds_planted_identity_checks(tmp_path: Path):
    (tmp_path / "ids.py").write_text(
        "if platform.device_type == 'cpu':\n"
        "    pass\n"
        "accel = 'cpu' != platform.device_type\n"
        "on_host = tensor.device.type == 'cpu'\n"
        "if self.device_type in ('cuda', 'hip'):\n"
        "    pass\n"
        "ok = torch.device(platform.device_type)  # naming it is fine, branching on it is not\n"
    )
    hits = find_hardware_names(tmp_path)
    assert [h.split(":")[1] for h in hits] == ["1", "3", "4", "5"]


def test_scanner_passes_clean_code(tmp_path: Path):
    (tmp_path / "ok.py").write_text("import torch\n# torch.cuda would be wrong here\ny = 1\n")
    assert find_hardware_names(tmp_path) == []
