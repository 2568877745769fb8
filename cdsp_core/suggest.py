"""`cdsp suggest`: which images to scribble next, ranked by how unsure the model is of them.

Each image is segmented once (whole, or in tiles like `cdsp predict`) and scored from the
per-pixel class probabilities p:
- entropy: the mean over pixels of −Σ_c p_c log p_c / log C (0: every pixel certain, 1: every
  pixel uniform over the C classes);
- margin (the default): the share of pixels whose top-two probabilities differ by less than
  --low-margin (pixels the model nearly labels otherwise).
Measured on the synthetic data (tests/test_suggest.py), the margin score follows the per-image
error (Spearman 0.3-0.5) and the mean entropy does not (about -0.2): a small model's diffuse
probabilities on cluttered background, which it still labels right, dominate the mean.
The images with the highest score come first: scribbles there teach the model most. The list
(--out, .csv or .json) holds both scores; a CVAT dataset manifest (manifest.jsonl, "for images")
lists the same images in the same order, so a CVAT task created from them with the sorting
method "Predefined" shows the most uncertain image first.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path

import torch
from PIL import Image

from cdsp_core import config, evaluate, losses
from cdsp_core.config import EvalConfig, SegTrainConfig
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text
from cdsp_core.progress import progress
from cdsp_core.transforms import to_normalized_tensor

log = logging.getLogger("cdsp.suggest")

SCORES = ("entropy", "margin")
LOW_MARGIN = 0.1


def image_scores(probs: torch.Tensor, low_margin: float = LOW_MARGIN) -> dict[str, float]:
    """Both uncertainty scores of one image's class probabilities (1×C×H×W)."""
    c = probs.shape[1]
    entropy = losses.entropy(probs.clamp_min(1e-12).log())  # log p are logits whose softmax is p
    top2 = probs.topk(2, dim=1).values
    return {"entropy": float(entropy.mean() / math.log(c)),
            "margin": float(((top2[:, 0] - top2[:, 1]) < low_margin).float().mean())}


def rank_images(model_uri: str, images: str, *, score: str = "margin", low_margin: float = LOW_MARGIN,
                device: str = "auto", tile: int = EvalConfig.eval_tile, exclude: str | None = None) -> list[dict]:
    """Every image of a folder or URI with its scores, most uncertain first (ties: by name).

    `exclude`, a folder of `<id>.png` scribbles, leaves out the images that already have one.
    """
    if score not in SCORES:
        raise CdspError(f"unknown score {score!r} (use {' or '.join(SCORES)})")
    if not 0 < low_margin <= 1:
        raise CdspError(f"--low-margin {low_margin} is not in (0, 1]")
    config.check_field(config.FIELDS["eval_tile"], tile)
    folder, files = evaluate.image_files(images)
    if exclude is not None:
        if not Path(exclude).is_dir():
            raise CdspError(f"{exclude}: scribble folder not found")
        done = {p.stem for p in Path(exclude).glob("*.png")}
        files = [f for f in files if f.stem not in done]
        if not files:
            raise CdspError(f"{images}: every image already has a scribble in {exclude}")
    dev = evaluate.resolve_device(device)
    model, _ = evaluate.load_model(model_uri, dev, kind="segmenter")
    rows = []
    for path in progress(files, "suggest"):
        image = evaluate.read_input_image(path, folder, images)
        x = to_normalized_tensor(Image.fromarray(image)).to(dev)[None].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = evaluate.probabilities(model, x, tile)
        rel = path.relative_to(folder)
        rows.append({"image": rel.as_posix(), "id": path.stem, "width": image.shape[1], "height": image.shape[0],
                     **image_scores(probs, low_margin)})
    rows.sort(key=lambda r: (-r[score], r["image"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def cvat_manifest(rows: list[dict]) -> str:
    """A CVAT dataset manifest for images (docs.cvat.ai, "Dataset manifest"): one JSON object a line."""
    lines = [{"version": "1.1"}, {"type": "images"}]
    for r in rows:
        name = Path(r["image"])
        lines.append({"name": name.with_suffix("").as_posix(), "extension": name.suffix, "width": r["width"],
                      "height": r["height"], "meta": {"related_images": []}})
    return "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)


COLUMNS = ("rank", "image", "id", "entropy", "margin", "width", "height")


def writable_file(path: Path, what: str) -> None:
    """Refuse, before any work, a file path that cannot be written: a folder, or below a file."""
    if path.is_dir():
        raise CdspError(f"{path}: {what} is a folder; name a file")
    parent = next(p for p in path.absolute().parents if p.exists())  # where atomic_write_text's mkdir starts
    if not parent.is_dir():
        raise CdspError(f"{path}: {what} is below {parent}, which is a file, not a folder")


def suggest(model_uri: str, images: str, out: str, *, n: int = 50, manifest: str | None = None,
            score: str = "margin", low_margin: float = LOW_MARGIN, device: str = "auto",
            tile: int = EvalConfig.eval_tile, exclude: str | None = None) -> list[dict]:
    """Write the n most uncertain images to `out` (.csv or .json) and their CVAT manifest; returns them."""
    out_path = Path(out)
    if out_path.suffix.lower() not in (".csv", ".json"):
        raise CdspError(f"{out}: --out must end in .csv or .json")
    if n < 1:
        raise CdspError(f"--n {n}: need at least one image")
    manifest_path = Path(manifest) if manifest else out_path.with_name("manifest.jsonl")
    if manifest_path.resolve() == out_path.resolve():
        raise CdspError(f"{manifest_path}: --manifest and --out are the same file")
    for path, what in ((out_path, "--out"), (manifest_path, "--manifest")):
        writable_file(path, what)
    rows = rank_images(model_uri, images, score=score, low_margin=low_margin, device=device, tile=tile,
                       exclude=exclude)[:n]
    if out_path.suffix.lower() == ".json":
        text = json.dumps({"model": model_uri, "images": images, "score": score, "low_margin": low_margin,
                           "suggested": [{k: r[k] for k in COLUMNS} for r in rows]}, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    atomic_write_text(out_path, text)
    atomic_write_text(manifest_path, cvat_manifest(rows))
    log.info("%d images ranked by %s -> %s (CVAT manifest %s)", len(rows), score, out_path, manifest_path)
    return rows


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("suggest", help="rank images by the model's uncertainty: what to scribble next",
                              description="Scores every image with a segmenter (entropy: mean pixel entropy / "
                                          "log C; margin: share of pixels whose top-two probabilities differ by "
                                          "less than --low-margin) and writes the most uncertain first, as CSV or "
                                          "JSON, plus a CVAT dataset manifest (manifest.jsonl) in the same order.")
    p.add_argument("--model", required=True, help="segmenter folder, s3:// URI or models:/<name>@<alias>")
    p.add_argument("--images", required=True, help="folder or s3:// URI of images")
    p.add_argument("--out", required=True, help="ranked list, FILE.csv or FILE.json")
    p.add_argument("--n", type=int, default=50, help="how many images to list (default: 50)")
    p.add_argument("--score", choices=SCORES, default="margin", help="what to rank by (default: margin; README: "
                   "on the synthetic data it tracks per-image error, the mean entropy does not)")
    p.add_argument("--low-margin", type=float, default=LOW_MARGIN,
                   help=f"margin score: a pixel is unsure when its top-two probabilities differ by less than this "
                        f"(default: {LOW_MARGIN})")
    p.add_argument("--manifest", default=None, help="CVAT manifest to write (default: manifest.jsonl beside --out)")
    p.add_argument("--exclude-labelled", default=None, metavar="SCRIBBLE_DIR",
                   help="leave out the images that have a <id>.png scribble in this folder")
    config.add_field_argument(p, SegTrainConfig, "device")
    config.add_field_argument(p, EvalConfig, "eval_tile")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    rows = suggest(args.model, args.images, args.out, n=args.n, manifest=args.manifest, score=args.score,
                   low_margin=args.low_margin, device=args.device, tile=args.eval_tile,
                   exclude=args.exclude_labelled)
    print(f"{len(rows)} images to scribble next, most uncertain first -> {args.out}")
    return 0
