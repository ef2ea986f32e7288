"""House rules that ruff does not check: no function body over 80 lines without a stated reason.

A function's body is measured from its first statement after the docstring to its last line. A
longer one is split into named private helpers, or, when it is truly one flow, carries
``# long-function: <reason>`` on the line right above its ``def`` (or above its first decorator).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tlmicroscope"
MAX_BODY_LINES = 80
MARK = "# long-function:"


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def has_reason(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """Whether the line above the ``def`` or above its first decorator carries the mark."""
    tops = [node.lineno] + [d.lineno for d in node.decorator_list]
    return any(top >= 2 and lines[top - 2].strip().startswith(MARK) for top in tops)


def long_functions(root: Path = PACKAGE, limit: int = MAX_BODY_LINES) -> list[tuple[str, int]]:
    """``(path:line name, body lines)`` of every function over ``limit`` lines without a reason."""
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = body_lines(node)
            if n > limit and not has_reason(node, lines):
                rel = path.relative_to(root.parent)
                out.append((f"{rel}:{node.lineno} {node.name}", n))
    return out


def test_body_lines_counts_from_the_first_statement_after_the_docstring():
    src = 'def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n\n    return a\n'
    (node,) = ast.parse(src).body
    assert body_lines(node) == 3
    (node,) = ast.parse('def g():\n    """Only a docstring."""\n').body
    assert body_lines(node) == 0


def test_the_reason_is_read_above_the_def_or_its_decorators(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_BODY_LINES + 1))
    (tmp_path / "m.py").write_text(
        f"def long_one():\n{body}\n"
        f"# long-function: one flow\ndef excused():\n{body}\n"
        f"# long-function: one flow\n@staticmethod\ndef decorated():\n{body}\n"
        f"def short():\n{body.splitlines(keepends=True)[0]}"
    )
    found = long_functions(tmp_path)
    assert [(name.split(" ")[1], n) for name, n in found] == [("long_one", MAX_BODY_LINES + 1)]


def test_no_function_body_over_80_lines_without_a_reason():
    found = long_functions()
    listing = "\n".join(f"  {name}: {n} lines" for name, n in sorted(found, key=lambda x: -x[1]))
    assert not found, (
        f"{len(found)} functions have bodies over {MAX_BODY_LINES} lines. Split each into named "
        f"private helpers, or put '{MARK} <reason>' on the line above its def:\n{listing}"
    )
