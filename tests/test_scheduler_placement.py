"""A sequence's placement (its executor, where the executor keeps its KV cache) has one owner:
the transitions of services/scheduler/sequence.py. Read from the source with ``ast``: no other
module assigns it, directly or through ``setattr``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from nats.aio.msg import Msg

from services.scheduler.sequence import Sequence
from shared.messages import AcceptedRequest
from shared.model.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services", "loadgen", "bench", "tests")
OWNER = ROOT / "services" / "scheduler" / "sequence.py"
# This checker assigns it once on purpose, to see the assignment refused.
CHECKER = Path(__file__).resolve()
PLACEMENT = frozenset({"executor", "kv_location", "_executor", "_kv_location"})


def assigned_attributes(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Every attribute name the module assigns (``x.a = ``, ``x.a += ``, ``x.a: T = ``,
    ``setattr(x, "a", ...)``), with its line."""
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in flatten(target)]
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            yield str(node.args[1].value), node.lineno
        for target in targets:
            if isinstance(target, ast.Attribute):
                yield target.attr, target.lineno


def flatten(target: ast.expr) -> Iterator[ast.expr]:
    """The single targets of a (possibly tuple) assignment target."""
    if isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from flatten(element)
    else:
        yield target


def placement_writes() -> list[str]:
    writes = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path in (OWNER, CHECKER):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for name, line in assigned_attributes(tree):
                if name in PLACEMENT:
                    writes.append(f"{path.relative_to(ROOT)}:{line} assigns .{name}")
    return writes


def test_only_the_sequence_writes_its_placement() -> None:
    assert placement_writes() == []


def test_the_check_sees_each_kind_of_write() -> None:
    source = (
        "s.executor = 'a'\n"
        "s.kv_location: str = 'host'\n"
        "a, s._executor = 1, None\n"
        "s._kv_location += ''\n"
        "setattr(s, 'executor', 'b')\n"
        "s.cached_tokens = 0\n"
    )
    names = [name for name, _ in assigned_attributes(ast.parse(source))]
    assert sorted(n for n in names if n in PLACEMENT) == sorted(
        ["executor", "kv_location", "_executor", "_kv_location", "executor"]
    )


def test_placement_changes_only_through_its_transitions(tokenizer: TextTokenizer) -> None:
    request = AcceptedRequest(
        request_id="r", prompt_token_ids=[1, 5, 6], max_tokens=4, temperature=0.0, top_p=1.0,
        seed=0, stop=[], stream=True, ignore_eos=True, reply_subject=None, encoding="msgpack",
        accepted_at=0.0,
    )  # fmt: skip
    sequence = Sequence.create(request, cast(Msg, object()), tokenizer, [])
    assert (sequence.executor, sequence.kv_location) == (None, "none")
    sequence.bind_to("a")
    sequence.cache_on_device()
    assert (sequence.executor, sequence.kv_location) == ("a", "device")
    sequence.bind_to("b")  # carried there: adopted into host memory
    sequence.cache_on_host()
    assert (sequence.executor, sequence.kv_location) == ("b", "host")
    sequence.lose_cache()
    assert (sequence.executor, sequence.kv_location, sequence.cached_tokens) == (None, "none", 0)
    with pytest.raises(AttributeError):
        sequence.executor = "c"  # type: ignore[misc]
