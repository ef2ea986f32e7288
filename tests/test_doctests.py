"""Every ``>>>`` example in ``tlmicroscope/`` runs and prints what its docstring says.

The examples are documentation, so they must stay true; they run on the tiny seeded models (an
example that needs the embedded model or more than ~2 s carries ``# doctest: +SKIP`` and a real
test covers the same call). One test per module that has examples, so xdist spreads them. Same
flags as ``pytest --doctest-modules tlmicroscope`` (``doctest_optionflags`` in pyproject.toml):
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``, so a long expected line may be wrapped.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlmicroscope"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# A prompt line with code on it (doctest skips a prompt that holds only a comment).
_PROMPT = re.compile(r"^\s*>>> +(?!#)\S", re.M)


def _modules_with_examples() -> list[str]:
    """Dotted names of the modules whose source has a ``>>>`` line (read, not imported)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py" or not _PROMPT.search(path.read_text(encoding="utf-8")):
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


MODULES = _modules_with_examples()


class _Finder(doctest.DocTestFinder):
    """doctest's finder, seeing through decorators (``functools.wraps``: ``__wrapped__``).

    The stock finder takes a decorated function for a foreign one (its globals are the
    decorator's module) and skips its examples; it also reads the line numbers off the wrapper.
    """

    def _from_module(self, module, object):
        return super()._from_module(module, inspect.unwrap(object))

    def _find_lineno(self, obj, source_lines):
        return super()._find_lineno(inspect.unwrap(obj) if callable(obj) else obj, source_lines)


def test_the_package_has_examples():
    assert len(MODULES) > 50, MODULES


@pytest.mark.models
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    tests = list({t.docstring: t for t in _Finder().find(module, name) if t.examples}.values())
    # Every prompt line in the file belongs to an example the finder reaches (a docstring of a
    # nested function or a string elsewhere would silently never run). A docstring reached twice
    # (an alias) counts and runs once.
    found = sum(len(t.examples) for t in tests)
    in_source = len(_PROMPT.findall(source))
    assert found == in_source, (
        f"{name} has {in_source} '>>>' lines but doctest reaches {found} examples: move the "
        "unreached ones into a module, class or function docstring."
    )
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed:\n" + (
        report.getvalue()
    )
