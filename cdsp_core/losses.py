"""The loss terms of CDSP (docs/cdsp-method.md, "Stage 2") and of the stage-1 scribble option.

Conventions shared by every function here:
- logits are B×C×h×w; when h×w differs from the label/weight size H×W they are upsampled
  here (bilinear, align_corners=False), so callers may pass either size.
- labels are B×H×W integer maps with 255 = ignored; weights are B×H×W in [0, 1]
  (a uint8 distance map is divided by 255 here).
- everything is computed in float32 with autocast off (entropies and log-probabilities in
  fp16/bf16 lose too much), and each loss is an average over the pixels that count, which
  is 0, not NaN, when none count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def _fp32_at(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    logits = logits.float()
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def _mean_over(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1)


def partial_ce(logits: torch.Tensor, scribble: torch.Tensor) -> torch.Tensor:
    """L_seg = −Σ_{p labelled} log softmax(z_p)[y_p] / #{p labelled}: CE on scribble pixels only."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = _fp32_at(logits, scribble.shape[-2:])
        total = F.cross_entropy(logits, scribble.long(), ignore_index=IGNORE, reduction="sum")
        return _mean_over(total, (scribble != IGNORE).sum())


def pseudo_ce(logits: torch.Tensor, pseudo: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """L_pseudo = Σ_p [(1−ε)·(−log p_{y_p}) + ε·(−1/C · Σ_c log p_c)] / #{p : y_p ≠ 255}.

    Cross-entropy with label smoothing ε on the pseudo-label (torch's `label_smoothing`).
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits = _fp32_at(logits, pseudo.shape[-2:])
        total = F.cross_entropy(logits, pseudo.long(), ignore_index=IGNORE, reduction="sum",
                                label_smoothing=smoothing)
        return _mean_over(total, (pseudo != IGNORE).sum())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """h = −Σ_c p_c log p_c per pixel (B×H×W), from log_softmax so it never meets log 0."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def distance_entropy_loss(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DEL(w) = Σ_p w(p)·h(p) / #{p : w(p)·h(p) ≠ 0}, h the prediction entropy (0 if nothing counts).

    `weight` is M/255 of a distance map (B×H×W, in [0, 1]); a uint8 map is divided by 255 here.
    """
    with torch.autocast(logits.device.type, enabled=False):
        weight = weight.float() / 255.0 if weight.dtype == torch.uint8 else weight.float()
        weighted = weight * entropy(_fp32_at(logits, weight.shape[-2:]))
        return _mean_over(weighted.sum(), (weighted != 0).sum())


LORM_DISTANCES = ("squared", "cosine")


def lorm_loss(features: torch.Tensor, rectified: torch.Tensor, where: torch.Tensor | None = None,
              distance: str = "squared") -> torch.Tensor:
    """L_lorm = Σ (F − F')² / #{nonzero terms}, F the backbone features, F' = models.LoRM(F, pseudo).

    F' is 0 off the foreground, so there the term is ‖F‖²: the method page's loss also shrinks
    every background feature. `where` (B×1×h×w booleans, e.g. `LoRM.foreground`) limits the
    sum to those positions: the `lorm_scope=foreground` option.

    distance="cosine" (needs `where`): the mean over those positions of 1 − cos(F_i, F'_i). The
    squared distance falls when F and F' shrink together, so on a network trained from scratch
    it pulls every feature toward 0 as well as toward its consensus; the cosine keeps the pull
    toward the consensus's direction and is blind to scale (docs/benchmarks.md).
    """
    with torch.autocast(features.device.type, enabled=False):
        features, rectified = features.float(), rectified.float()
        if distance == "cosine":
            if where is None:
                raise ValueError("the cosine LoRM distance needs the positions to sum over (where)")
            gap = 1 - F.cosine_similarity(features, rectified, dim=1, eps=1e-6)[:, None]  # B×1×h×w
            mask = where.to(gap.dtype)
            return _mean_over((gap * mask).sum(), mask.sum())
        squared = (features - rectified) ** 2
        if where is not None:
            squared = squared * where.to(squared.dtype)
        return _mean_over(squared.sum(), (squared != 0).sum())


def cam_partial_ce(class_maps: torch.Tensor, scribble: torch.Tensor, background_logit: float = 0.0) -> torch.Tensor:
    """Stage-1 option `cls_scribble_ce`: partial CE on scribble pixels through the classifier's CAM head.

    The per-pixel logits are [b, w_1·F, ..., w_{C−1}·F]: a constant background logit b (default 0,
    so background means "no class score is positive", as ReLU CAMs read it) and the class maps
    before ReLU from `Classifier.class_maps` (B×(C−1)×h×w, upsampled to the scribble size).
    Returns partial_ce of those logits.
    """
    background = class_maps.new_full((class_maps.shape[0], 1, *class_maps.shape[2:]), background_logit)
    return partial_ce(torch.cat([background, class_maps], dim=1), scribble)
