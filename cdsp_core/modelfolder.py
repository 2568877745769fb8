"""A model folder, as training writes it (`train.fit`) and every other stage reads it:

    checkpoint.pt   the last training checkpoint (model, optimiser, scaler, scheduler, epoch, RNG), for --resume
    model.pt        the final weights, written last: a folder with it holds a finished model
    config.json     the settings, the class names and the architecture (`kind`: classifier or segmenter)
    history.json    the per-epoch metrics

Weights load with `torch.load(weights_only=True)`. torch is imported by the functions that load
them, not with this module: the pipeline's data-prep step and the checkpoint mirror use the file
names without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cdsp_core import config
from cdsp_core.errors import CdspError, load_failure

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
CONFIG = "config.json"
HISTORY = "history.json"


# The settings that make the network of each kind (`build_model`); the first ones are required, the
# others were added later and have defaults.
ARCHITECTURE = {"classifier": (("cls_backbone", "cls_output_stride"), ("cls_width",)),
                "segmenter": (("segmenter", "backbone"), ("output_stride", "width", "aspp_rates", "stem_stride"))}


def read_config(folder: str | Path) -> dict:
    """The folder's config.json, checked to describe a classifier or a segmenter with its classes, and
    its architecture settings to be ones the config accepts (cdsp_core/config.py)."""
    path = Path(folder) / CONFIG
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CdspError(f"{path}: missing (not a model folder written by cdsp train-classifier/train-seg)") from e
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise CdspError(f"{path}: unreadable model config: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(info, dict) or info.get("kind") not in ARCHITECTURE or not info.get("class_names"):
        raise CdspError(f"{path}: not a cdsp model config (needs kind and class_names)")
    names = info["class_names"]
    if not (isinstance(names, list) and 2 <= len(names) <= 255 and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)):
        raise CdspError(f"{path}: class_names must be a list of 2 to 255 distinct names")
    required, _ = ARCHITECTURE[info["kind"]]
    missing = [k for k in required if info.get(k) is None]
    if missing:
        raise CdspError(f"{path}: a {info['kind']} config needs {' and '.join(missing)}")
    try:
        config.check_values({k: info.get(k) for keys in ARCHITECTURE[info["kind"]] for k in keys}, named=str)
    except CdspError as e:
        raise CdspError(f"{path}: {e}") from e
    return info


def build_model(info: dict) -> nn.Module:
    """The untrained network that a model config describes."""
    from cdsp_core import models  # torch: see the module docstring

    n = len(info["class_names"])
    if info["kind"] == "classifier":
        return models.build_classifier(info["cls_backbone"], n, info["cls_output_stride"],
                                       width=info.get("cls_width", 64))
    # Models written before output_stride, width, aspp_rates and stem_stride were settings had stride 8,
    # width 64, the architecture's own rates and torchvision's stem.
    return models.build_segmenter(info["segmenter"], info["backbone"], n, output_stride=info.get("output_stride", 8),
                                  width=info.get("width", 64), aspp_rates=info.get("aspp_rates", ""),
                                  stem_stride=info.get("stem_stride", 4))


def load(folder: str | Path, device: torch.device | str = "cpu", kind: str | None = None) -> tuple[nn.Module, dict]:
    """(network in eval mode on `device`, its config) of the finished model in a local folder."""
    import torch

    folder = Path(folder)
    info = read_config(folder)
    if kind and info["kind"] != kind:
        raise CdspError(f"{folder}: holds a {info['kind']}, but a {kind} is needed here")
    try:  # settings that are each accepted but not together (an output stride the stem cannot give)
        model = build_model(info)
    except CdspError as e:
        raise CdspError(f"{folder / CONFIG}: {e}") from e
    path = folder / WEIGHTS
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CdspError(f"{path}: missing (training did not finish? resume it with --resume)") from e
    except Exception as e:  # truncated files and unpickling errors come in many types
        raise CdspError(f"{path}: corrupt or unreadable weights ({load_failure(e)})") from e
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # another architecture or class count
        raise CdspError(f"{path}: weights do not fit the architecture in {CONFIG}: {str(e).splitlines()[0]}") from e
    return model.to(device, memory_format=torch.channels_last).eval(), info
