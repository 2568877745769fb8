"""Generate the source of a KFP component function from the typed config.

A lightweight KFP component ships its function's *source* (kfp reads it with
`inspect.getsource`) and the executor calls it by its signature. So that every stage setting
is a component input without being copied by hand, the signature is written here from the
dataclass fields (`name: type = default`, with the field's help as the input description),
followed by the step's artifacts and plain inputs. The body is one call into a step function
of `components/steps.py`, whose source kfp embeds beside it (`additional_funcs`).

The generated source is registered in `linecache` under a readable pseudo file name, which is
where `inspect.getsource` finds it.
"""

from __future__ import annotations

import dataclasses
import linecache
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from kfp import dsl

from cdsp_core import config

# (name, annotation source, default or dataclasses.MISSING, help)
Param = tuple[str, str, Any, str]


def config_params(*classes: type) -> list[Param]:
    """The inputs derived from config dataclasses: one per field, with its type, default and help."""
    return [(f.name, f.type if isinstance(f.type, str) else f.type.__name__, f.default, f.metadata.get("help", ""))
            for cls in classes for f in config.fields_of(cls)]


def function_source(name: str, doc: str, artifacts: Sequence[tuple[str, str]], params: Sequence[Param],
                    returns: str | None, step: Callable) -> str:
    """The source of `def name(<artifacts>, <params>) -> returns: return step(**locals())`."""
    required = [p for p in params if p[2] is dataclasses.MISSING]
    optional = [p for p in params if p[2] is not dataclasses.MISSING]
    args = [f"{a}: {ann}" for a, ann in artifacts]
    args += [f"{p}: {ann}" for p, ann, _, _ in required]
    args += [f"{p}: {ann} = {default!r}" for p, ann, default, _ in optional]
    arg_docs = [f"{p}: {help_text}" for p, _, _, help_text in (*required, *optional) if help_text]
    docstring = doc.strip() + ("\n\nArgs:\n" + textwrap.indent("\n".join(arg_docs), "    ") if arg_docs else "")
    signature = ",\n".join("    " + a for a in args)
    ret = f" -> {returns}" if returns else ""
    return (f"def {name}(\n{signature},\n){ret}:\n"
            f"{textwrap.indent(repr_docstring(docstring), '    ')}\n"
            f"    return {step.__name__}(**locals())\n")


def repr_docstring(text: str) -> str:
    if '"""' in text or text.endswith("\\"):
        raise ValueError(f"cannot embed this docstring: {text!r}")
    return f'"""{text}\n"""'


def define(source: str, name: str, step: Callable) -> Callable:
    """Compile `source` as kfp's executor will (with `from kfp.dsl import *`) and return the function."""
    filename = f"<cdsp component {name}>"
    # mtime None: linecache.checkcache() leaves the entry alone, so inspect.getsource finds it.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": f"cdsp_component_{name}"}
    exec("from kfp.dsl import *\nfrom typing import *", namespace)
    namespace[step.__name__] = step
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[name]


def make_component(name: str, doc: str, *, artifacts: Sequence[tuple[str, str]], params: Sequence[Param],
                   returns: str | None, step: Callable, helpers: Sequence[Callable] = (),
                   image: str) -> dsl.PythonComponent:
    """A lightweight component running `step` in `image` (which already holds kfp and cdsp_core)."""
    names = [a for a, _ in artifacts] + [p[0] for p in params]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"component {name}: inputs named twice: {duplicates}")
    func = define(function_source(name, doc, artifacts, params, returns, step), name, step)
    return dsl.component(func, base_image=image, install_kfp_package=False,
                         additional_funcs=[*helpers, step])
