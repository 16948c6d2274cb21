"""How readable the tree is, in numbers: the largest modules and classes, long functions,
engine type checks, hand-built error replies, repeated code and the README's size.

    python -m bench.structure

Counts ``shared/``, ``services/`` and ``loadgen/``; the ``duplicates`` row needs the
``duplicates`` tool on PATH (it says so when it is missing).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "services", "loadgen")
LONG_FUNCTION_LINES = 80
# The one module allowed to read and write nats.micro's error headers.
RPC_MODULE = Path("shared/rpc.py")


@dataclass(frozen=True)
class Span:
    where: str
    lines: int


def python_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def relative(path: Path) -> Path:
    return path.relative_to(ROOT)


def module_sizes(files: list[Path]) -> list[Span]:
    return [Span(str(relative(path)), len(path.read_text().splitlines())) for path in files]


def _definitions(tree: ast.AST, kinds: tuple[type[ast.AST], ...]) -> list[ast.AST]:
    return [node for node in ast.walk(tree) if isinstance(node, kinds)]


def _span(path: Path, node: ast.AST) -> Span:
    name = getattr(node, "name", "?")
    start, end = node.lineno, node.end_lineno or node.lineno  # type: ignore[attr-defined]
    return Span(f"{relative(path)}:{start} {name}", end - start + 1)


def class_sizes(trees: dict[Path, ast.AST]) -> list[Span]:
    return [
        _span(path, node)
        for path, tree in trees.items()
        for node in _definitions(tree, (ast.ClassDef,))
    ]


def function_sizes(trees: dict[Path, ast.AST]) -> list[Span]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return [_span(path, node) for path, tree in trees.items() for node in _definitions(tree, kinds)]


def engine_type_checks(trees: dict[Path, ast.AST]) -> list[str]:
    """``isinstance(x, ...Engine...)`` calls: places that branch on the engine's class."""
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance"):
                continue
            if len(node.args) == 2 and "Engine" in ast.unparse(node.args[1]):
                found.append(f"{relative(path)}:{node.lineno}")
    return found


# nats.micro's own Request.respond_error (shared.rpc.respond_error is the typed way).
HAND_BUILT_ERROR = re.compile(r"(?<!rpc)\.respond_error\(|ERROR_CODE_HEADER|Nats-Service-Error")


def hand_built_error_replies(files: list[Path]) -> list[str]:
    """Lines outside ``shared/rpc.py`` that build or read nats.micro error headers by hand."""
    found = []
    for path in files:
        if relative(path) == RPC_MODULE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith(("from ", "import ", "#")):
                continue
            if HAND_BUILT_ERROR.search(line):
                found.append(f"{relative(path)}:{number}")
    return found


def duplicate_pairs() -> str:
    tool = shutil.which("duplicates")
    if tool is None:
        return "n/a (the duplicates tool is not on PATH)"
    listing = subprocess.run(
        [tool, "--most", "200", "--seconds", "180", "--repo", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    pairs = [line for line in listing.splitlines() if re.match(r"D\d+ ", line)]
    return str(len(pairs))


def _top(spans: list[Span], count: int = 5) -> list[Span]:
    return sorted(spans, key=lambda span: span.lines, reverse=True)[:count]


def main() -> None:
    files = python_files()
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in files}
    functions = function_sizes(trees)
    long_functions = [span for span in functions if span.lines > LONG_FUNCTION_LINES]
    print(f"# Structure of {', '.join(PACKAGES)} ({len(files)} modules)\n")
    print("largest modules (lines):")
    for span in _top(module_sizes(files)):
        print(f"  {span.lines:5d}  {span.where}")
    print("largest classes (lines):")
    for span in _top(class_sizes(trees)):
        print(f"  {span.lines:5d}  {span.where}")
    print(f"functions over {LONG_FUNCTION_LINES} lines: {len(long_functions)}")
    for span in _top(long_functions, count=len(long_functions)):
        print(f"  {span.lines:5d}  {span.where}")
    checks = engine_type_checks(trees)
    print(f"isinstance engine checks: {len(checks)}  {' '.join(checks)}")
    replies = hand_built_error_replies(files)
    print(f"hand-built error replies/headers outside {RPC_MODULE}: {len(replies)}")
    print(f"duplicates pairs (whole tree): {duplicate_pairs()}")
    print(f"README.md: {(ROOT / 'README.md').stat().st_size} bytes")
    print(
        f"summary: largest_module={_top(module_sizes(files), 1)[0].lines}"
        f" largest_class={_top(class_sizes(trees), 1)[0].lines}"
        f" long_functions={len(long_functions)} engine_isinstance={len(checks)}"
        f" hand_built_errors={len(replies)}"
        f" readme_bytes={(ROOT / 'README.md').stat().st_size}"
    )


if __name__ == "__main__":
    main()
