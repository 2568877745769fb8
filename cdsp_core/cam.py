"""Class activation maps and the pseudo-labels made from them (docs/cdsp-method.md, stage 1).

    cams = compute_cams(classifier, image, labels)                   # K×H×W in [0, 1]
    pseudo = cams_to_pseudo_label(cams, labels, threshold=0.3)        # H×W uint8

Options of "Beyond the paper" (each off by default; the benchmark decides):
- `margin`: pixels whose best and second-best scores differ by less are marked 255 (ignored);
- `refine_with_scribbles`: a random walk that diffuses the scores over image-colour affinities
  with the scribble pixels clamped to their class; its scores go to `scores_to_pseudo_label`.

`labels` is always the image's present foreground classes (values 1..C−1 as in the label
maps, e.g. from its scribble); CAM row k belongs to class labels[k]. Absent classes get no row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cdsp_core.models import Classifier


@torch.no_grad()
def compute_cams(classifier: Classifier, image_tensor: torch.Tensor, labels: Sequence[int],
                 scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), flip: bool = True) -> torch.Tensor:
    """Multi-scale (+ flip) CAMs of the present classes: float32 K×H×W in [0, 1], K = len(labels).

    `image_tensor` is one normalised image, 3×H×W or 1×3×H×W, on the classifier's device.
    For every scale (and its horizontal flip) the raw CAMs ReLU(w_c·F) are upsampled
    (bilinear) to H×W and summed; the sum is divided by its per-class maximum, as in the
    reference CAM code (IRN), so each class peaks at 1 (a class whose CAM is 0 everywhere stays 0).
    The classifier is run in eval mode (its previous mode is restored).
    """
    image = image_tensor[None] if image_tensor.dim() == 3 else image_tensor
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image 3×H×W or 1×3×H×W, got shape {tuple(image_tensor.shape)}")
    height, width = image.shape[-2:]
    n_fg = classifier.n_classes - 1
    if any(not 1 <= c <= n_fg for c in labels):
        raise ValueError(f"labels must be foreground classes 1..{n_fg}, got {list(labels)}")
    total = torch.zeros(len(labels), height, width, device=image.device)
    if not labels:
        return total
    rows = torch.tensor([c - 1 for c in labels], device=image.device)  # logit k is class k + 1

    was_training = classifier.training
    classifier.eval()
    try:
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                    align_corners=False)
            if flip:
                x = torch.cat([x, x.flip(-1)])
            cams = classifier.forward_cams(x)[0][:, rows].float()
            if flip:
                cams = cams[:1] + cams[1:].flip(-1)
            total += F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)[0]
    finally:
        classifier.train(was_training)
    return total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)


def scores_to_pseudo_label(scores: torch.Tensor, labels: Sequence[int], margin: float = 0.0) -> np.ndarray:
    """Argmax over class scores (K+1)×H×W, row 0 = background, row k = labels[k−1]: H×W uint8.

    Ties go to the lower row (background first). With margin > 0, pixels whose best two
    scores differ by less than `margin` become 255 (ignored).
    """
    if scores.shape[0] != len(labels) + 1:
        raise ValueError(f"expected {len(labels) + 1} score rows for labels {list(labels)}, got {scores.shape[0]}")
    scores = scores.float().cpu()
    classes = torch.tensor([0, *labels], dtype=torch.uint8)
    label = classes[scores.argmax(dim=0)]
    if margin > 0 and scores.shape[0] > 1:
        best_two = scores.topk(2, dim=0).values
        label[best_two[0] - best_two[1] < margin] = 255
    return label.numpy()


def cams_to_pseudo_label(cams: torch.Tensor, labels: Sequence[int], threshold: float,
                         margin: float = 0.0) -> np.ndarray:
    """Pseudo-label H×W uint8: argmax over [τ, CAMs of the present classes] (τ = `threshold`).

    A pixel is background unless some present class's CAM exceeds τ. See `scores_to_pseudo_label`
    for `margin`.
    """
    background = cams.new_full((1, *cams.shape[-2:]), threshold)
    return scores_to_pseudo_label(torch.cat([background, cams]), labels, margin)


def refine_with_scribbles(cams: torch.Tensor, labels: Sequence[int], image: np.ndarray, scribble: np.ndarray,
                          threshold: float, iterations: int = 50, radius: int = 3, sigma: float = 0.1,
                          downscale: int = 4) -> torch.Tensor:
    """Random-walk refinement: scores (K+1)×H×W in [0, 1], row 0 background, row k = labels[k−1].

    Starts from [τ, CAMs] and repeats `iterations` times s ← T·s with the scribble pixels
    clamped to their class (one-hot), where T is the row-normalised affinity to every pixel
    within `radius` (itself included), a_ij = exp(−‖I_i − I_j‖² / 2σ²) on RGB colours in [0, 1].
    Runs on a grid `downscale` times coarser (area-averaged scores and colours; a cell is a
    seed in proportion to the classes of the scribble pixels it holds), then upsamples
    bilinearly and clamps the scribble pixels again at full resolution. Scribble classes not
    in `labels` are ignored. `image` is H×W×3 uint8, `scribble` H×W (255 = unlabelled).
    """
    height, width = cams.shape[-2:]
    if image.ndim != 3 or image.shape[:2] != (height, width) or scribble.shape != (height, width):
        raise ValueError(f"image {image.shape}, scribble {scribble.shape} and CAMs {tuple(cams.shape)} differ in size")
    classes = [0, *labels]
    scores = torch.cat([torch.full((1, height, width), float(threshold)), cams.float().cpu()])
    onehot = torch.stack([torch.from_numpy(np.asarray(scribble) == c) for c in classes]).float()
    colour = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0

    grid = (math.ceil(height / downscale), math.ceil(width / downscale))

    def coarse(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None], size=grid, mode="area")[0]

    s, colour_c, seed_mass = coarse(scores), coarse(colour), coarse(onehot)
    seeded = seed_mass.sum(0) > 0
    seed = seed_mass / seed_mass.sum(0).clamp(min=1e-12)

    # Affinity to each neighbour offset (0 outside the grid), then row-normalise with the self-loop.
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy * dy + dx * dx <= radius * radius]
    padded_colour = F.pad(colour_c, (radius,) * 4)
    inside = F.pad(torch.ones(1, *grid), (radius,) * 4)
    h, w = grid

    def shifted(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:  # t padded by radius; value at (y+dy, x+dx)
        return t[:, radius + dy: radius + dy + h, radius + dx: radius + dx + w]

    affinity = torch.stack([
        torch.exp(-((shifted(padded_colour, dy, dx) - colour_c) ** 2).sum(0) / (2 * sigma**2))
        * shifted(inside, dy, dx)[0] for dy, dx in offsets])
    transition = affinity / affinity.sum(0, keepdim=True)

    for _ in range(iterations):
        s = torch.where(seeded, seed, s)
        padded = F.pad(s, (radius,) * 4)
        s = sum(transition[i] * shifted(padded, dy, dx) for i, (dy, dx) in enumerate(offsets))
    s = torch.where(seeded, seed, s)

    refined = F.interpolate(s[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    on_scribble = onehot.sum(0) > 0
    return torch.where(on_scribble, onehot, refined).clamp(0, 1)
