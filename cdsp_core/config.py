"""The one typed home of every setting.

The CLI flags, the KFP component inputs and the pipeline parameters are all derived
from these dataclasses (see `add_arguments`, `from_namespace` and `pipelines/`), so a
setting is declared once, here, with its default, its help text and what it accepts.

Field types are limited to str, int, float and bool so that every field can also be a
KFP pipeline parameter. What a field accepts is declared with it (`opt`'s keywords) and
checked when a config is made (`Settings.__post_init__` -> `check`), so the CLI, the
components and the pipeline refuse the same values, by name, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError

T = TypeVar("T")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (used for --help and the pipeline docs) and what it accepts:

    - min / max: inclusive bounds; above / below: exclusive ones (every int and float field has bounds,
      so NaN and infinities are refused too);
    - off: one value outside the bounds that switches the setting off (eval_tile 0);
    - choices: the values a str or int may take;
    - items (a parser of the text that raises ValueError) or pattern (a regex the whole text
      matches), with accepts: what a user is told the text may be.
    """
    return field(default=default, metadata={"help": help, **kw})


# Inference scales (CAMs, multi-scale evaluation): below a tenth an image is a few pixels (or none: a
# size of 0 fails), above 4 its tiles multiply for little gain.
MIN_SCALE, MAX_SCALE = 0.1, 4.0
MAX_RATE = 256  # an atrous rate: beyond any feature map this project meets (465-px crops give 59x59)


def numbers_in(text: str, kind: type, lo: float, hi: float, *, allow_empty: bool = False) -> list:
    """'0.5, 1' -> [0.5, 1.0]: comma-separated numbers of `kind` from lo to hi (ValueError otherwise)."""
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except (ValueError, OverflowError):
        values = [math.nan]
    if not (values or allow_empty) or not all(lo <= v <= hi for v in values):  # also NaN
        raise ValueError(f"expected comma-separated {kind.__name__}s from {lo} to {hi}, got {text!r}")
    return values


def parse_scales(text: str) -> list[float]:
    """Comma-separated inference scales ('0.5,1.0'), each from MIN_SCALE to MAX_SCALE, at least one."""
    return numbers_in(text, float, MIN_SCALE, MAX_SCALE)


def parse_rates(text: str) -> list[int]:
    """Comma-separated atrous rates ('6,12,18,24'), each from 1 to MAX_RATE; empty: the architecture's own."""
    return numbers_in(text, int, 1, MAX_RATE, allow_empty=True)


SCALES = f"comma-separated scales from {MIN_SCALE} to {MAX_SCALE}"
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2")  # = models.BACKBONES
DEVICE = r"auto|cpu|cuda(:[0-9]+)?"
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
MAX_EPOCHS, MAX_BATCH, MAX_CROP, MAX_WIDTH, MAX_WORKERS, WEEK_MINUTES = 100_000, 4096, 8192, 1024, 256, 7 * 24 * 60


class Settings:
    """The base of every config dataclass: an instance is checked as it is made (see `check`)."""

    def __post_init__(self) -> None:
        check(self)


@dataclass
class ClassifierConfig(Settings):
    """Stage 1: the multi-label classifier trained on image-level labels from scribbles."""

    cls_backbone: str = opt("resnet50", "classifier backbone: resnet18|resnet34|resnet50|resnet101|resnet152|"
                                            "mobilenet_v2", choices=BACKBONES)
    cls_pretrained: str = opt("", "classifier backbone weights, file or URI: ImageNet's (torchvision layout) "
                                  "or an earlier model.pt's backbone; empty: from scratch")
    cls_width: int = opt(64, "classifier backbone width (first-stage channels): 64 is torchvision's; less is "
                             "cheaper, for from-scratch CPU runs", min=1, max=MAX_WIDTH)
    cls_output_stride: int = opt(16, "backbone output stride (16, or 8 for small images)", choices=(8, 16, 32))
    cls_epochs: int = opt(20, "classifier training epochs", min=1, max=MAX_EPOCHS)
    cls_batch_size: int = opt(16, "classifier batch size", min=1, max=MAX_BATCH)
    cls_lr: float = opt(0.01, "classifier learning rate (SGD)", above=0, max=10)
    cls_backbone_lr: float = opt(1.0, "classifier backbone's learning rate as a fraction of cls_lr (below 1: a "
                                      "pretrained backbone moves slower than the new 1x1 classifier)", min=0, max=10)
    cls_crop_size: int = opt(448, "classifier training crop size", min=16, max=MAX_CROP)
    cls_scribble_ce: float = opt(0.0, "weight of a partial CE on scribble pixels through the CAM head (0: off)",
                                 min=0, max=1000)
    cls_weight_decay: float = opt(1e-4, "classifier SGD weight decay (momentum 0.9)", min=0, max=1)
    cls_warmup_epochs: int = opt(1, "classifier linear warm-up epochs before cosine decay", min=0, max=MAX_EPOCHS)
    cls_amp: bool = opt(True, "classifier mixed precision (bf16 on CPU, fp16 with a scaler on CUDA)")
    cls_workers: int = opt(4, "classifier data-loading worker processes", min=0, max=MAX_WORKERS)
    cls_checkpoint_minutes: float = opt(10.0, "classifier: also checkpoint (and mirror) every this many minutes "
                                              "within an epoch, the most a pre-empted step loses (0: epoch ends only)",
                                        min=0, max=WEEK_MINUTES)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_image_batch(self.cls_batch_size, self.cls_crop_size, self.cls_output_stride, "cls_")


def check_one_image_batch(batch_size: int, crop_size: int, output_stride: int, prefix: str) -> None:
    """A batch of one image trains BatchNorm only where the backbone's last map has more than one pixel."""
    if batch_size == 1 and crop_size <= output_stride:
        raise CdspError(f"{flag(prefix + 'batch_size')} 1 with {flag(prefix + 'crop_size')} {crop_size} leaves one "
                        f"pixel per channel at output stride {output_stride}, which BatchNorm cannot train on; use a "
                        "larger crop or batch")


@dataclass
class PseudoLabelConfig(Settings):
    """CAM pseudo-labels and the two distance maps."""

    cam_threshold: float = opt(0.3, "background score tau: a pixel is background unless some CAM exceeds it",
                               min=0, max=1)
    cam_scales: str = opt("0.5,1.0,1.5,2.0", "comma-separated CAM inference scales (each also flipped)",
                          items=parse_scales, accepts=SCALES)
    cam_margin: float = opt(0.0, "mark pixels whose top-two CAM score margin is below this as 255 (0: off)",
                            min=0, max=1)
    cam_random_walk: bool = opt(False, "refine CAMs by propagating scribble seeds over colour affinities")
    lambda_s: float = opt(math.e, "lambda_s of the scribble distance map", above=0, max=1_000_000_000)
    lambda_c: float = opt(math.e**6, "lambda_c of the pseudo-label boundary distance map", above=0, max=1_000_000_000)
    distance_include_background: bool = opt(False, "count background strokes in the scribble distance map")


@dataclass
class SegTrainConfig(Settings):
    """Stage 2: CDSP segmentation training (defaults = the paper's reference recipe)."""

    segmenter: str = opt("deeplabv2", "segmenter: deeplabv2|deeplabv3p", choices=("deeplabv2", "deeplabv3p"))
    backbone: str = opt("resnet101", "backbone: resnet18|resnet34|resnet50|resnet101|resnet152|mobilenet_v2",
                        choices=BACKBONES)
    pretrained: str = opt("", "backbone weights, file or URI: ImageNet's (torchvision layout) or an earlier "
                              "model.pt's backbone (a classifier's or segmenter's); nothing is downloaded")
    width: int = opt(64, "backbone width (first-stage channels): 64 is torchvision's and needed for ImageNet "
                         "weights; less is cheaper, for from-scratch CPU runs", min=1, max=MAX_WIDTH)
    output_stride: int = opt(8, "segmenter backbone output stride: 8 (the paper's) or 16 (about 3x cheaper)",
                             choices=(4, 8, 16, 32))
    stem_stride: int = opt(4, "stride of the segmenter backbone's stem: 4 (the ResNet's 7x7 convolution at stride 2, "
                              "then a max-pool) or 2 (no max-pool: layer1 and layer2 at twice the resolution, for "
                              "small images; ImageNet weights still fit)", choices=(4, 2))
    aspp_rates: str = opt("", "atrous rates of the segmenter head, comma-separated; empty: the architecture's own "
                              "(DeepLab-v2 6,12,18,24, v3+ 6,12,18, made for 41x41 feature maps)",
                          items=parse_rates, accepts=f"empty or comma-separated whole numbers from 1 to {MAX_RATE}")
    l_seg: float = opt(1.0, "weight of the partial CE on scribbles (0 switches it off)", min=0, max=1000)
    l_pseudo: float = opt(1.0, "weight of the smoothed CE on pseudo-labels (0 switches it off)", min=0, max=1000)
    l_lorm: float = opt(1.0, "weight of the LoRM loss (0 switches it off)", min=0, max=1000)
    lorm_scope: str = opt("all", "positions the LoRM loss sums over: all (the method page's: off the foreground "
                                 "it shrinks the features themselves) or foreground (pseudo-label foreground only)",
                          choices=("all", "foreground"))
    lorm_temperature: float = opt(1.0, "temperature of LoRM's cosine attention, softmax(cos/t): 1 (the method's) "
                                        "spreads it over the whole feature map, so every foreground feature is pulled "
                                        "toward the image's mean; smaller attends to similar features",
                                  above=0, max=100)
    lorm_distance: str = opt("squared", "how far F is from F' in the LoRM loss: squared (the method page's "
                                        "sum of (F - F')^2, which also falls when every feature shrinks) or cosine "
                                        "(1 - cos(F, F') per position, blind to the features' scale; needs "
                                        "--lorm-scope foreground)", choices=("squared", "cosine"))
    l_ds: float = opt(1.0, "weight of the DEL on the scribble distance map (0 switches it off)", min=0, max=1000)
    l_dc: float = opt(1.0, "weight of the DEL on the boundary distance map (0 switches it off)", min=0, max=1000)
    seg_target: str = opt("scribble", "target of L_seg: scribble, or gt (full ground truth: the supervised baseline)",
                          choices=("scribble", "gt"))
    label_smoothing: float = opt(0.1, "label smoothing epsilon of the pseudo-label CE", min=0, below=1)
    crop_size: int = opt(465, "random crop size", min=16, max=MAX_CROP)
    scale_min: float = opt(0.5, "random scale, lower bound", above=0, max=10)
    scale_max: float = opt(2.0, "random scale, upper bound", above=0, max=10)
    rotation: float = opt(10.0, "random rotation, degrees either way", min=0, max=180)
    epochs: int = opt(50, "training epochs", min=1, max=MAX_EPOCHS)
    batch_size: int = opt(16, "batch size (per process)", min=1, max=MAX_BATCH)
    optimizer: str = opt("sgd", "sgd (with momentum, the paper's) or adamw (converges faster from scratch)",
                         choices=("sgd", "adamw"))
    lr: float = opt(1e-3, "base learning rate", above=0, max=10)
    backbone_lr: float = opt(1.0, "backbone's learning rate as a fraction of lr (below 1: a pretrained backbone "
                                  "moves slower than the new head)", min=0, max=10)
    freeze_bn: bool = opt(False, "keep the backbone's BatchNorm layers in eval mode while training (their ImageNet "
                                 "statistics, not those of small batches)")
    momentum: float = opt(0.9, "SGD momentum (adamw: beta1)", min=0, below=1)
    weight_decay: float = opt(5e-4, "weight decay", min=0, max=1)
    warmup_epochs: int = opt(5, "linear warm-up epochs before cosine decay", min=0, max=MAX_EPOCHS)
    device: str = opt("auto", "auto|cpu|cuda", pattern=DEVICE, accepts="auto, cpu, cuda or cuda:N")
    amp: bool = opt(True, "mixed precision (bf16 on CPU, fp16 with a scaler on CUDA)")
    workers: int = opt(4, "data-loading worker processes", min=0, max=MAX_WORKERS)
    checkpoint_minutes: float = opt(10.0, "also checkpoint (and mirror) every this many minutes within an epoch, "
                                          "the most a pre-empted step loses (0: epoch ends only)",
                                    min=0, max=WEEK_MINUTES)
    seed: int = opt(0, "random seed", min=0, max=SEED_MAX)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_min > self.scale_max:
            raise CdspError(f"{flag('scale_min')} {self.scale_min} is above {flag('scale_max')} {self.scale_max}")
        if self.batch_size == 1 and self.segmenter == "deeplabv3p":
            raise CdspError("--batch-size 1 cannot train deeplabv3p: the BatchNorm of its image pooling would see "
                            "one value per channel; use 2 or more")
        check_one_image_batch(self.batch_size, self.crop_size, self.output_stride, "")


@dataclass
class EvalConfig(Settings):
    """Evaluation on the val split."""

    multi_scale: bool = opt(False, "multi-scale + flip inference")
    eval_scales: str = opt("0.5,0.75,1.0,1.25,1.5", "scales for multi-scale inference", items=parse_scales,
                           accepts=SCALES)
    n_overlays: int = opt(4, "colour overlays to write (image | scribbles | ground truth | prediction, with a legend)",
                          min=0, max=100_000)
    eval_tile: int = opt(1024, "images larger than this (either side) are predicted in overlapping tiles (0: whole)",
                         off=0, min=32, max=MAX_CROP)


@dataclass
class BenchConfig(Settings):
    """`cdsp bench`: the ablation and scribble-robustness benchmark (not a pipeline step)."""

    seeds: int = opt(3, "segmenter seeds per bench run (seed, seed+1, ...); mIoU is reported as mean and spread",
                     min=1, max=1000)
    runs: str = opt("all", "comma-separated bench run names (e.g. scribble-only,cdsp), or all")
    jobs: int = opt(1, "bench runs trained at the same time, each in its own process with its share of the CPU "
                       "threads (2 on a 2-core machine is about twice as fast as 1)", min=1, max=MAX_WORKERS)
    degrade_seed: int = opt(0, "seed of the drop(0.5)/shrink(0.5) scribbles of the robustness runs",
                            min=0, max=SEED_MAX)
    curve_val_images: int = opt(20, "val images behind each bench run's per-epoch val_miou curve (the first of the "
                                    "val split; 0: no curve); the reported mIoU always uses the whole val split",
                                min=0, max=1_000_000)
    bench_experiment: str = opt("cdsp-bench", "MLflow experiment that receives every bench run")
    mlflow: bool = opt(True, "log every bench run to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)")


# The presets' LoRM (docs/benchmarks.md, "CDSP ahead, and why"): at temperature 1 the attention is
# nearly uniform, so every foreground feature is pulled toward the image's mean feature (-8 points after
# 20 epochs on the synthetic data, foreground scope or not); at 0.1 each feature attends to those like it.
# Foreground scope: off the foreground the paper's loss is ||F||^2, which shrinks the background features
# the heads need. Cosine distance: the squared one also falls when the features shrink, and they did (by
# 12%; -2.6 points at 15 epochs, 3 seeds); 1 - cos keeps only the pull toward the consensus.
LORM_RECTIFIED = {"lorm_scope": "foreground", "lorm_temperature": 0.1, "lorm_distance": "cosine"}

# Presets: named overrides of the defaults above. "paper" is the reference recipe (the
# defaults); "cpu" trains tiny models on tiny images in minutes on a 2-core CPU; "cpu-pretrained"
# fine-tunes ImageNet's MobileNetV2 on ~256-px photos on a 2-core CPU (give it the weights:
# --pretrained and --cls-pretrained).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        # Measured on the synthetic data (96-px images) from scratch, no ImageNet weights.
        # classifier: the narrow net learns as much as the standard one in a third of the time
        "cls_backbone": "resnet18",
        "cls_width": 16,
        "cls_output_stride": 8,
        "cls_epochs": 10,
        "cls_batch_size": 16,
        "cls_lr": 0.01,
        "cls_crop_size": 64,
        "cls_amp": False,  # bf16 autocast is slow on CPUs without native bf16 units
        "cls_workers": 0,
        # segmenter (docs/benchmarks.md, "Ablation"): from scratch, a narrow ResNet-18 (width 16,
        # 0.7 M parameters) learns more per CPU second than the standard one, and AdamW more than
        # SGD (whose loss climbs above lr 1e-3). Output stride 8, not 16: on 96-px images, logits
        # at stride 16 (6x6) cap the val mIoU at 0.73 even if every logit were right; at 8, 0.89.
        # docs/benchmarks.md, "A trainer that learns": the head's atrous rates scaled to the 12x12
        # feature map of a 96-px image (the paper's 6..24 see only padding there: +5 points); 80-px
        # crops of images scaled 0.75-1.25 (most objects whole); no rotation (the objects come at
        # every angle already). docs/benchmarks.md, "The stem": no max-pool after the 7x7 convolution
        # (stem stride 2), so layer1 and layer2 see the objects' textures at twice the resolution
        # (+10 points with scribbles after 15 epochs, +13 with full masks, for 25% more time per
        # epoch), and lr 3e-3; 40 epochs, which keep a run within the yardstick's wall time.
        "segmenter": "deeplabv2",
        "backbone": "resnet18",
        "width": 16,
        "output_stride": 8,
        "stem_stride": 2,
        "aspp_rates": "1,2,4,6",
        "crop_size": 80,
        "scale_min": 0.75,
        "scale_max": 1.25,
        "rotation": 0.0,
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.0001,
        "warmup_epochs": 1,
        "workers": 0,
        "amp": False,
        **LORM_RECTIFIED,
        # pseudo-labels (benchmarks/stage1_sweep.py, docs/benchmarks.md "Stage 1"): the random walk
        # from the scribble seeds lifts the pseudo-labels' mIoU from 0.20 to 0.83 (0.86 on the 98%
        # of pixels the margin keeps); one CAM scale scores as well as two, at half the cost
        "cam_scales": "1.0",
        "cam_random_walk": True,
        "cam_threshold": 0.9,
        "cam_margin": 0.1,
        # distance maps scaled to 96-px images: the paper's lambdas are set for ~465-px VOC images
        # (M_s reaches 0 at 155 px, M_b saturates at 12.75 px); lambda x (465/96)^2 keeps those
        # distances the same fraction of the image (32 px and 2.6 px). With the paper's values
        # DEL cost 2.2 points after 20 epochs; with these it is neutral.
        "lambda_s": 63.5,
        "lambda_c": 9515.0,
    },
    "cpu-pretrained": {
        # ImageNet's MobileNetV2 in both stages, ~256-px photos (../shared/data/voc-real), a 2-core CPU:
        # docs/benchmarks.md, "Real photos". Pass the weights with --pretrained and --cls-pretrained.
        "cls_backbone": "mobilenet_v2",
        "cls_output_stride": 16,
        # one classifier epoch: on all 3,131 photos of voc-real 395 s, then pseudo-labels 426 s (0.710 mIoU):
        # stage 1 in 13.7 minutes on 2 cores (two epochs would take 20)
        "cls_epochs": 1,
        "cls_batch_size": 16,
        "cls_lr": 0.01,
        "cls_backbone_lr": 0.1,
        "cls_crop_size": 225,
        "cls_warmup_epochs": 0,
        "cls_amp": False,
        "cls_workers": 0,
        # segmenter: DeepLab-v2's head (four 3x3 convolutions to class scores) at output stride 16 on
        # MobileNetV2's last block (320 channels, as DeepLab reads it; models.MobileNetV2): 7.7 images/s
        # with LoRM where the 1280-channel map took 4.1, and 0.450 against 0.439 on held-out photos
        # (scribbles, 2 epochs); DeepLab-v3+ (decoder at stride 4) 1.7, stride 8 1.7 (on 1280 channels).
        # Crops of 225 px (sides 1 mod 32: the TF padding of the ImageNet weights).
        # Fully supervised, one epoch of 1,000 photos, 300 held out: AdamW at 1e-3 with the backbone at a
        # tenth and its BatchNorm frozen 0.395; AdamW 1e-4 everywhere 0.365; SGD 1e-3 0.269; SGD 1e-2
        # (head) 0.10 (diverged). 161-px crops, twice the steps in the same time: 0.399 (no gain).
        "segmenter": "deeplabv2",
        "backbone": "mobilenet_v2",
        "output_stride": 16,
        "aspp_rates": "1,2,4,6",
        "crop_size": 225,
        "scale_min": 0.5,
        "scale_max": 1.5,
        "rotation": 0.0,
        "epochs": 2,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.001,
        "backbone_lr": 0.1,
        "freeze_bn": True,
        "weight_decay": 0.0001,
        "warmup_epochs": 0,
        "workers": 0,
        "amp": False,
        # LoRM on real photos (make bench-real): its term trains (1 - cos 0.21 -> 0.07) but adds nothing
        # measurable (-0.2 / -0.0 on two paired seeds) for half again the time; the method page's form
        # costs 21 points. --l-lorm 0 leaves it out.
        **LORM_RECTIFIED,
        # pseudo-labels (benchmarks/stage1_sweep.py, docs/benchmarks.md "Real photos"): on 300 training photos
        # the CAMs alone score 0.38 at best (tau 0.3), below what the scribble-only segmenter predicts on the
        # same photos (0.47); refined by the random walk from the scribbles 0.64-0.71 (tau 0.2-0.6). One CAM
        # scale: 0.698 against 0.705 with scales 1 and 1.5, in a third of the time.
        "cam_scales": "1.0",
        "cam_random_walk": True,
        "cam_threshold": 0.5,
        # distance maps: the paper's lambdas are set for ~465-px images; x (465/256)^2 keeps the distances
        # the same fraction of a 256-px photo (as the cpu preset does for 96 px)
        "lambda_s": 9.0,
        "lambda_c": 1331.0,
    },
}


# Every config class, in pipeline order. Field names are unique across all of them, so
# they can share one CLI namespace and one set of pipeline parameters.
ALL_CONFIGS: tuple[type, ...] = (ClassifierConfig, PseudoLabelConfig, SegTrainConfig, EvalConfig)


def fields_of(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------- what a setting accepts

FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in (*ALL_CONFIGS, BenchConfig) for f in fields_of(cls)}
_KINDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}
_RULES = ("min", "max", "above", "below", "off", "choices", "items", "pattern")


def _either(values: tuple) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def accepts(f: dataclasses.Field) -> str:
    """What a field accepts, in words: 'a whole number from 1 to 4096', 'sgd or adamw', ..."""
    m = f.metadata
    if "choices" in m:
        return _either(m["choices"])
    if "accepts" in m:
        return m["accepts"]
    lo = f">= {m['min']}" if "min" in m else f"> {m['above']}" if "above" in m else ""
    hi = f"<= {m['max']}" if "max" in m else f"< {m['below']}" if "below" in m else ""
    bounds = f"from {m['min']} to {m['max']}" if "min" in m and "max" in m else " and ".join(filter(None, (lo, hi)))
    text = f"{_KINDS[f.type]} {bounds}".strip()
    return f"{m['off']} (off) or {text}" if "off" in m else text


def _typed(f: dataclasses.Field, value: Any) -> bool:
    if f.type == "bool" or isinstance(value, bool):
        return f.type == "bool" and isinstance(value, bool)
    if f.type == "float":
        try:  # an int too large for a float is not finite either
            return isinstance(value, numbers.Real) and math.isfinite(value)
        except OverflowError:
            return False
    return isinstance(value, {"int": numbers.Integral, "str": str}[f.type])


def _fits(f: dataclasses.Field, value: Any) -> bool:
    m = f.metadata
    if not _typed(f, value):
        return False
    if "choices" in m:
        return value in m["choices"]
    if "pattern" in m:
        return re.fullmatch(m["pattern"], value) is not None
    if "items" in m:
        try:
            m["items"](value)
        except ValueError:
            return False
        return True
    if f.type not in ("int", "float") or ("off" in m and value == m["off"]):
        return True
    return (m.get("min", -math.inf) <= value <= m.get("max", math.inf)
            and m.get("above", -math.inf) < value < m.get("below", math.inf))


def check_field(f: dataclasses.Field, value: Any, named: Callable[[str], str] = flag) -> None:
    """Refuse a value its field does not accept: CdspError `--batch-size must be ..., got 0` (`named`
    says how the setting is named: as its flag, or as the key of a file)."""
    if not _fits(f, value):
        shown = repr(redact(value) if isinstance(value, str) else value)  # redacted whole, then shortened
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CdspError(f"{named(f.name)} must be {accepts(f)}, got {shown}")


def check(cfg: Any) -> None:
    """Every field of a config dataclass against what it declares (run as each config is made)."""
    for f in fields_of(type(cfg)):
        check_field(f, getattr(cfg, f.name))


def check_values(values: Mapping[str, Any], named: Callable[[str], str] = flag) -> None:
    """The settings among `values` (parsed CLI flags, pipeline arguments, a model's config.json: keys
    that are no field are ignored, None is unset), each against its field: so the flags a command
    takes one by one (`add_field_argument`) are checked too, before any work."""
    for name, value in values.items():
        if name in FIELDS and value is not None:
            check_field(FIELDS[name], value, named)


_SCALARS = {"int": int, "float": float, "str": str}  # a field's annotation (a string here) -> its parser
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _add_field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, f: dataclasses.Field, default: Any) -> None:
    """The flag of one field: `--name VALUE`, or `--name/--no-name` for a bool."""
    rule = f"; {accepts(f)}" if any(k in f.metadata for k in _RULES) else ""
    help_text = f"{f.metadata.get('help', '')} (default: {f.default}{rule})"
    if f.type in ("bool", bool):
        parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
    else:
        parser.add_argument(flag(f.name), dest=f.name, type=_SCALARS.get(f.type, f.type), default=default,
                            help=help_text)


def add_arguments(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Add one flag per field of each dataclass (`--l-seg`, `--amp/--no-amp`, ...)."""
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        for f in fields_of(cls):
            _add_field(group, f, None)  # None: unset, so that build() applies the preset
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named defaults: 'paper' (reference recipe), 'cpu' (tiny, for a laptop), 'cpu-pretrained' "
                             "(ImageNet MobileNetV2 on ~256-px photos, for a laptop)")


def add_field_argument(parser: argparse.ArgumentParser, cls: type, name: str) -> None:
    """One setting of `cls` as a flag of a command whose own config lacks it (`--device` and `--seed`
    of cdsp train-classifier, `--device` of cdsp evaluate, ...): the flag and dest it has wherever
    `cls` is added whole, with the field's default (no preset applies here) and help."""
    f = next(f for f in fields_of(cls) if f.name == name)
    _add_field(parser, f, f.default)


def build(cls: type[T], preset: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """An instance of `cls`: defaults, then the preset, then explicit overrides (None = unset).

    Keys of `overrides` that are not fields of `cls` are ignored, so one namespace or dict
    can feed every config class.
    """
    names = {f.name for f in fields_of(cls)}
    values = {k: v for k, v in PRESETS.get(preset or "paper", {}).items() if k in names}
    values.update({k: v for k, v in (overrides or {}).items() if k in names and v is not None})
    return cls(**values)


def parse_overrides(cls: type, text: str) -> dict[str, Any]:
    """'width=32,lr=0.001' -> typed overrides of `cls`'s fields (for benchmark scripts' variants)."""
    types = {f.name: f.type for f in fields_of(cls)}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in types:
            raise ValueError(f"{part!r}: expected name=value with a {cls.__name__} field as the name")
        if types[key] == "bool":
            if value.lower() not in _BOOLS:
                raise ValueError(f"{part!r}: {key} is a bool ({'/'.join(_BOOLS)})")
            out[key] = _BOOLS[value.lower()]
        else:
            out[key] = _SCALARS[types[key]](value)
    return out


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """The config of `cls` from parsed CLI flags (preset applied under explicit flags)."""
    return build(cls, getattr(ns, "preset", None), vars(ns))


def to_dict(*configs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in configs:
        out.update(dataclasses.asdict(c))
    return out


def settings_digest(settings: Any) -> str:
    """The SHA-256 (hex) of settings as canonical JSON (keys sorted; other types as str): the one way a
    set of settings is hashed, to tell whether a finished step, a mirrored checkpoint or a dataset
    (prepare's fingerprint) is the same as before."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# Settings of the Kubeflow pipeline itself (see pipelines/). They are not stage settings, so
# they are not in ALL_CONFIGS and have no `cdsp` flags; field names stay unique all the same.


@dataclass
class PipelineConfig(Settings):
    """Run parameters of the Kubeflow pipeline besides the stage settings."""

    data_uri: str = opt("", "dataset root in the VOC layout: a local path or s3://bucket/prefix")
    scribble_dir: str = opt("pascal_2012_scribble", "folder of scribble PNGs under the dataset root")
    split_dir: str = opt("", "folder of the train/val lists under the dataset root (empty: found automatically)")
    external_pseudo_uri: str = opt("", "pseudo-labels from another method (folder of PNGs); empty: CAM pseudo-labels")
    # The GPU counts are strings: KFP's driver reads a parameterised accelerator limit as a string
    # value and sets no limit for a number (pipelines/cdsp_pipeline.py, `configure`).
    cls_gpus: str = opt("1", "GPUs for the classifier, CAM and evaluation steps, a whole number (0: run them on CPU)")
    gpus: str = opt("1", "GPUs for segmentation training, a whole number; more than one runs DDP through torchrun "
                         "in the pod")
    force_train: bool = opt(False, "train even when the champion was trained on the same data fingerprint")


@dataclass
class ClusterConfig(Settings):
    """Compile-time settings of the pipeline; each is read from the env var CDSP_<NAME> at compile time."""

    image: str = opt("ghcr.io/cdsp-pipelines/cdsp-cpu:0.1.0", "image of the CPU steps (images/Dockerfile.cpu)")
    cuda_image: str = opt("ghcr.io/cdsp-pipelines/cdsp-cuda:0.1.0",
                          "image of the steps that may use a GPU (images/Dockerfile.cuda)")
    pipeline_root: str = opt("s3://cdsp-artifacts/kfp", "where KFP keeps the artifacts of every run (an S3 URI)")
    checkpoint_root: str = opt("", "where the training steps mirror their checkpoints, so that a retried pod resumes: "
                                   "an S3 URI or a folder; empty: <pipeline_root>/checkpoints")
    data_store: str = opt("", "where data prep keeps every dataset file once, by content, with each run's manifest "
                              "(cdsp_core/datastore.py): an S3 URI or a folder; empty: <pipeline_root>/datastore")
    s3_secret: str = opt("cdsp-s3", "Kubernetes secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    mlflow_secret: str = opt("cdsp-mlflow", "Kubernetes secret with MLFLOW_TRACKING_URI (and optional credentials)")
    settings_config_map: str = opt("cdsp-settings",
                                   "optional ConfigMap with AWS_ENDPOINT_URL_S3 and PUSHGATEWAY_URL")
    accelerator: str = opt("nvidia.com/gpu", "Kubernetes resource name of the accelerator")
    step_cpu: str = opt("4", "CPU request of the data, classifier, CAM and evaluation steps")
    step_memory: str = opt("16Gi", "memory request and limit of the data, classifier, CAM and evaluation steps")
    seg_cpu: str = opt("8", "CPU request of segmentation training (per pod)")
    seg_memory: str = opt("48Gi", "memory request and limit of segmentation training")
    shm_percent: int = opt(25, "share (%) of the memory limit of the classifier and segmentation training pods "
                               "that their in-memory /dev/shm (data-loader workers, NCCL) may fill; it counts "
                               "against that limit")
    retries: int = opt(2, "retries of a failed step (exponential backoff)")
