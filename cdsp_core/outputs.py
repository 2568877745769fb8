"""The output policy: how every cdsp command and pipeline step writes its output folder, and how
the names it takes from users and stored records are kept inside their folders.

- An output folder is built in a staging folder beside it and swapped in whole only on success
  (`output_dir`, on fsutil.atomic_dir): a failure leaves what was there before untouched.
  Training, which resumes from checkpoints in its folder, stages its own way (train.py).
- Every output folder holds MARKER, {"kind": ...}: what wrote it. An existing folder is replaced
  only when it is empty or written by the same kind of output; never when it holds anything else.
  Folders written before the marker are recognised by the files that kind wrote (KINDS).
- An output equal to an input, inside one, or holding one is refused (`refuse_nesting`).
- A relative name taken from a user or a stored record (scribble and split folders, object keys)
  must stay under its root as named (`unsafe`, `confined`): no absolute path, no '..'. Links
  inside a dataset are followed (a dataset view is made of them); the names are confined, the
  link targets are the dataset owner's choice.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_dir, atomic_write_text

MARKER = "cdsp-output.json"


def _model(kind: str) -> Callable[[Path, set[str]], bool]:
    """A model folder of `kind`: its config.json says so; without one (an interrupted run, or a
    checkpoint restored from the pipeline's mirror) only training files."""
    def old(folder: Path, names: set[str]) -> bool:
        if not names <= {"checkpoint.pt", "model.pt", "config.json", "history.json"}:
            return False
        if "config.json" not in names:
            return "checkpoint.pt" in names
        return _json(folder / "config.json").get("kind") == kind
    return old


def _copied_dataset(folder: Path, names: set[str]) -> bool:
    return "manifest.json" in names and _json(folder / "manifest.json").get("copied") is True


# kind -> (what a user calls it, how a folder written before MARKER is recognised). The file names
# are those the older versions wrote: literals on purpose, they do not follow later renames.
KINDS: dict[str, tuple[str, Callable[[Path, set[str]], bool]]] = {
    "classifier": ("model folder (classifier)", _model("classifier")),
    "segmenter": ("model folder (segmenter)", _model("segmenter")),
    "pseudo-labels": ("pseudo-label folder", lambda f, n: "summary.json" in n and n <= {
        "summary.json", "config.json", "pseudo_labels", "distance_scribble", "distance_boundary"}),
    "manifest": ("manifest folder (cdsp prepare)", lambda f, n: n == {"manifest.json"}),
    "dataset": ("dataset copy (cdsp prepare --copy or cdsp checkout)", _copied_dataset),
    "dataset-record": ("data-store record folder (cdsp prepare --store)",
                       lambda f, n: "dataset.json" in n and n <= {"dataset.json", "manifest.json"}),
    "dataset-view": ("bench dataset view", lambda f, n: "view.json" in n),
    "bench": ("bench folder", lambda f, n: "bench.json" in n),
    "evaluation": ("evaluation folder", lambda f, n: "metrics.json" in n),
    "predictions": ("prediction folder", lambda f, n: "predictions.json" in n),
    "scribbles": ("converted scribble folder", lambda f, n: "convert-scribbles.json" in n),
    "degraded-scribbles": ("degraded scribble folder", lambda f, n: "degrade-scribbles.json" in n),
    "synthetic-dataset": ("synthetic dataset", lambda f, n: "synth.json" in n),
}


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_temporary(path: Path) -> bool:
    """A file that fsutil.atomic_path was writing when its process was killed."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def kind_of(folder: str | os.PathLike) -> str | None:
    """The kind of output in `folder`'s marker; None without a marker, "?" for an unreadable one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    return str(_json(path).get("kind") or "?")


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind}) + "\n")


def staging(out: str | os.PathLike) -> Path:
    """The staging folder of a training run over a finished model in `out` (train.training_folder):
    beside `out`, under a fixed name, so that --resume finds it again."""
    out = Path(out).absolute()  # `--out .` has a name too
    return out.with_name(f".{out.name}.partial")


def _local(given: str | os.PathLike) -> Path | None:
    text = str(given)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return None if "://" in text else Path(text)


def refuse_nesting(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output folder that is an input, lies inside one, or holds one: compared as named
    (absolute) and resolved (links followed), so an --out reached through a link is caught either way."""
    for given in inputs:
        folder = _local(given) if given else None
        if folder is None:
            continue
        for target, source in ((Path(os.path.abspath(out)), Path(os.path.abspath(folder))),
                               (Path(out).resolve(), folder.resolve())):
            if target == source or source in target.parents:
                where = "is the input" if target == source else "lies inside the input"
                raise CdspError(f"{out}: the output folder {where} {given}; choose an --out outside it")
            if target in source.parents:
                raise CdspError(f"{out}: the output folder holds the input {given} (replacing it would delete "
                                "it); choose another --out")


def check_target(out: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse `out` unless it may become (or be replaced by) an output of `kind` (see the module docstring)."""
    out = Path(out)
    refuse_nesting(out, inputs)
    if not out.exists():
        return
    what, old = KINDS.get(kind, (f"{kind} folder", lambda f, n: False))
    if not out.is_dir():
        raise CdspError(f"{out}: exists and is not a folder; choose a new --out")
    names = {p.name for p in out.iterdir() if not is_temporary(p)}
    found = kind_of(out)
    if not names or found == kind or (found is None and old(out, names)):
        return
    if found is not None:
        holds = KINDS.get(found, (f"{found} output",))[0]
        raise CdspError(f"{out}: holds a {holds} ({MARKER}), not a {what}; it is kept: choose a new --out")
    raise CdspError(f"{out}: output folder is not empty and is not a {what} written by cdsp (no {MARKER}; it holds "
                    f"{', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}); it is kept: "
                    "choose a new --out")


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, kind: str, *,
               inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Build the output folder `out` of `kind` in a staging folder beside it; on success it replaces `out`
    whole (checked by `check_target` first), on failure `out` stays as it was."""
    check_target(out, kind, inputs=inputs)
    with atomic_dir(out) as tmp:
        write_marker(tmp, kind)
        yield tmp


# --- names from users and stored records -----------------------------------------------------

def unsafe(name: str, noun: str = "name") -> str | None:
    """Why the relative '/'-separated `name` could leave the folder it is joined to; None if it cannot.
    (`noun`: what the reason calls it, e.g. "key" for an object key.)"""
    if not name:
        return f"empty {noun}"
    if name.startswith("/"):
        return f"absolute {noun}"
    if "\\" in name or "\0" in name:
        return f"backslash or NUL in {noun}"
    bad = next((part for part in name.split("/") if part in ("", ".", "..")), None)
    return None if bad is None else f"{'empty' if not bad else repr(bad)} path segment"


def confined(root: str | os.PathLike, name: str, what: str) -> str:
    """`name` (trailing '/' dropped) if, joined to `root`, it stays under `root` as named; else a CdspError."""
    name = str(name).rstrip("/") or str(name)
    problem = unsafe(name, "path")
    if problem:
        raise CdspError(f"{name or repr(name)}: the {what} must be a folder inside {root}, named relative to it "
                        f"without '..' ({problem}); nothing was written")
    return name
