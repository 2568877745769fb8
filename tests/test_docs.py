"""The docs cannot drift from the code: every test they cite exists, and the stage functions
docs/design.md shows have the signatures the code has."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `tests/test_x.py::test_name` (also without `tests/`, also `name[param-id]`) and `tests/file.py`
NAMED = re.compile(r"(?<![\w/])(?:tests/)?((?:test_\w+|conftest)\.py)::(\w+)")
FILES = re.compile(r"(?<![\w/])tests/(\w+\.py)\b")


def defined(path: Path) -> set[str]:
    """The module-level functions of a test file: its tests and fixtures."""
    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}


def test_every_test_the_docs_cite_exists():
    cited, missing = 0, []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FILES.finditer(text):
            cited += 1
            if not (REPO / "tests" / match[1]).is_file():
                missing.append(f"{doc.name}: tests/{match[1]}")
        for match in NAMED.finditer(text):
            cited += 1
            path = REPO / "tests" / match[1]
            if not path.is_file() or match[2] not in defined(path):
                missing.append(f"{doc.name}: tests/{match[1]}::{match[2]}")
    assert cited > 50  # the patterns do find the citations
    assert missing == []


def design_signatures() -> list[tuple[str, str, ast.FunctionDef]]:
    """(module, function, its signature as a `def`) for each stage function in docs/design.md."""
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"## Stage functions.*?```python\n(.*?)```", text, re.S)[1]
    block = re.sub(r"#.*", "", block)  # the comments saying what each returns
    entries = re.split(r"^(?=\w+\.\w+\()", block, flags=re.M)
    out = []
    for entry in filter(str.strip, entries):
        module, function = re.match(r"(\w+)\.(\w+)\(", entry).groups()
        tree = ast.parse("def " + entry.split(".", 1)[1].strip() + ": ...")
        out.append((module, function, tree.body[0]))
    return out


def normal(annotation: str) -> str:
    return ast.unparse(ast.parse(annotation, mode="eval"))


def test_the_stage_functions_in_design_md_have_the_codes_signatures():
    shown = design_signatures()
    assert {f for _, f, _ in shown} >= {"prepare", "train_classifier", "pseudo_label", "train_segmenter", "evaluate",
                                         "predict"}
    for module_name, function, doc in shown:
        module = importlib.import_module(f"cdsp_core.{module_name}")
        real = inspect.signature(getattr(module, function))
        a = doc.args
        positional = [*a.posonlyargs, *a.args]
        defaults = dict(zip([p.arg for p in positional][len(positional) - len(a.defaults):], a.defaults))
        defaults |= {p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
        kinds = {**{p.arg: inspect.Parameter.POSITIONAL_OR_KEYWORD for p in positional},
                 **{p.arg: inspect.Parameter.KEYWORD_ONLY for p in a.kwonlyargs}}
        where = f"docs/design.md: {module_name}.{function}"
        assert list(kinds) == list(real.parameters), where
        for p in [*positional, *a.kwonlyargs]:
            want = real.parameters[p.arg]
            assert kinds[p.arg] == want.kind, (where, p.arg)
            assert normal(ast.unparse(p.annotation)) == normal(str(want.annotation)), (where, p.arg)
            if p.arg in defaults:  # a literal or a name of the module, e.g. MAX_OBJECT_BYTES
                value = eval(compile(ast.Expression(defaults[p.arg]), where, "eval"), vars(module))
                assert value == want.default, (where, p.arg)
            else:
                assert want.default is inspect.Parameter.empty, (where, p.arg)
        assert normal(ast.unparse(doc.returns)) == normal(str(real.return_annotation)), where
