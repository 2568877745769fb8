"""Loss terms against values computed independently (numpy, explicit loops) on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdsp_core.losses import (
    cam_partial_ce,
    distance_entropy_loss,
    lorm_loss,
    partial_ce,
    pseudo_ce,
)
from cdsp_core.models import LoRM


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-softmax over the first axis of one pixel's scores (float64)."""
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 2
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, :] = 255
    labels[1, 2, 1:4] = 255
    return logits, labels


def loop_ce(logits: np.ndarray, labels: np.ndarray, eps: float = 0.0) -> float:
    b, c, h, w = logits.shape
    total, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = labels[i, y, x]
                if t == 255:
                    continue
                lp = np_log_softmax(logits[i, :, y, x])
                total += (1 - eps) * -lp[t] + eps * -lp.mean()
                n += 1
    return total / n


def test_partial_ce_matches_loops(tiny):
    logits, labels = tiny
    expected = loop_ce(logits.double().numpy(), labels.numpy())
    assert partial_ce(logits, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_pseudo_ce_label_smoothing_matches_loops(tiny, eps):
    logits, labels = tiny
    expected = loop_ce(logits.double().numpy(), labels.numpy(), eps)
    assert pseudo_ce(logits, labels, smoothing=eps).item() == pytest.approx(expected, rel=1e-5)
    if eps:
        assert pseudo_ce(logits, labels, smoothing=eps).item() != pytest.approx(partial_ce(logits, labels).item())


def test_distance_entropy_loss_matches_loops(tiny):
    logits, _ = tiny
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(2, 3, 5, generator=g)
    weight[0, 1, :] = 0  # pixels with weight 0 do not count in the denominator
    z = logits.double().numpy()
    w = weight.double().numpy()
    total, n = 0.0, 0
    for i in range(2):
        for y in range(3):
            for x in range(5):
                lp = np_log_softmax(z[i, :, y, x])
                h = -(np.exp(lp) * lp).sum()
                if w[i, y, x] * h != 0:
                    total += w[i, y, x] * h
                    n += 1
    assert n == 25
    assert distance_entropy_loss(logits, weight).item() == pytest.approx(total / n, rel=1e-5)
    # a uint8 distance map is read as M/255
    m = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    z1 = torch.randn(1, 3, 1, 3)
    assert distance_entropy_loss(z1, m).item() == pytest.approx(
        distance_entropy_loss(z1, m.float() / 255).item(), rel=1e-6)


def test_distance_entropy_loss_values_by_hand():
    # uniform over 4 classes: h = log 4 at every pixel, so DEL = Σ w·log4 / #{w≠0}
    logits = torch.zeros(1, 4, 2, 2)
    weight = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]])
    assert distance_entropy_loss(logits, weight).item() == pytest.approx(1.75 * math.log(4) / 3, rel=1e-6)
    # a saturated prediction has h = 0 in float32, and does not count either
    sat = torch.tensor([200.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2).clone()
    sat[0, :, 0, 0] = 0.0
    assert distance_entropy_loss(sat, torch.ones(1, 2, 2)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_logits_are_upsampled_to_the_label_size():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(1, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (1, 8, 8), generator=g)
    weight = torch.rand(1, 8, 8, generator=g)
    big = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert partial_ce(small, labels).item() == pytest.approx(partial_ce(big, labels).item(), rel=1e-6)
    assert pseudo_ce(small, labels).item() == pytest.approx(pseudo_ce(big, labels).item(), rel=1e-6)
    assert distance_entropy_loss(small, weight).item() == pytest.approx(
        distance_entropy_loss(big, weight).item(), rel=1e-6)


def test_every_loss_is_zero_not_nan_when_nothing_counts():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    feats = torch.randn(2, 5, 2, 2, requires_grad=True)
    losses = [partial_ce(logits, ignored), pseudo_ce(logits, ignored),
              distance_entropy_loss(logits, torch.zeros(2, 4, 4)),
              lorm_loss(feats, feats.detach().clone()),
              cam_partial_ce(logits[:, 1:], ignored)]
    for loss in losses:
        assert loss.item() == 0.0
    sum(losses).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(feats.grad).all()


def test_gradients_flow(tiny):
    logits, labels = tiny
    logits = logits.clone().requires_grad_(True)
    feats = torch.randn(2, 6, 3, 3, requires_grad=True)
    lorm = LoRM(6)
    pseudo = torch.randint(0, 3, (2, 12, 12))
    total = (partial_ce(logits, labels) + pseudo_ce(logits, labels)
             + distance_entropy_loss(logits, torch.rand(2, 3, 5)) + lorm_loss(feats, lorm(feats, pseudo)))
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    for p in lorm.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert lorm.gamma.grad.abs() > 0


def test_losses_are_float32_under_autocast(tiny):
    logits, labels = tiny
    weight = torch.rand(2, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.to(torch.bfloat16)
        values = [partial_ce(low, labels), pseudo_ce(low, labels), distance_entropy_loss(low, weight)]
    ref = [partial_ce(low.float(), labels), pseudo_ce(low.float(), labels),
           distance_entropy_loss(low.float(), weight)]
    for v, r in zip(values, ref):
        assert v.dtype == torch.float32
        assert v.item() == pytest.approx(r.item(), rel=1e-6)


def test_lorm_loss_matches_loops():
    rng = np.random.default_rng(3)
    b, c, h, w = 2, 3, 2, 3
    feats = rng.normal(size=(b, c, h, w))
    feats[0, :, 0, 0] = 0.0  # a zero feature vector behind the background: its terms are 0 and do not count
    pseudo = np.array([[[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [255, 255, 255, 2, 2, 2], [255, 255, 255, 2, 2, 2]],
                       [[1, 1, 0, 0, 3, 3], [1, 1, 0, 0, 3, 3], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]])
    # 4×6 label → 2×3 features by nearest neighbour: take every second row and column
    mask = np.isin(pseudo[:, ::2, ::2], [0, 255], invert=True)

    lorm = LoRM(c).double()
    wq = rng.normal(size=(c, c))
    wk = rng.normal(size=(c, c))
    bq = rng.normal(size=c)
    bk = rng.normal(size=c)
    gamma = 0.7
    with torch.no_grad():
        lorm.query.weight.copy_(torch.from_numpy(wq)[:, :, None, None])
        lorm.query.bias.copy_(torch.from_numpy(bq))
        lorm.key.weight.copy_(torch.from_numpy(wk)[:, :, None, None])
        lorm.key.bias.copy_(torch.from_numpy(bk))
        lorm.gamma.fill_(gamma)

    total, count, fg_total, fg_count = 0.0, 0, 0.0, 0
    for i in range(b):
        pos = [(y, x) for y in range(h) for x in range(w)]
        for (yi, xi) in pos:
            q = wq @ feats[i, :, yi, xi] + bq
            sims = []
            for (yj, xj) in pos:
                k = wk @ feats[i, :, yj, xj] + bk
                sims.append(q @ k / (np.linalg.norm(q) * np.linalg.norm(k)))
            a = np.exp(sims) / np.exp(sims).sum()
            rect = gamma * mask[i, yi, xi] * sum(a[j] * feats[i, :, yj, xj] for j, (yj, xj) in enumerate(pos))
            for ch in range(c):
                term = (feats[i, ch, yi, xi] - rect[ch]) ** 2
                total += term
                count += term != 0
                if mask[i, yi, xi]:
                    fg_total += term
                    fg_count += term != 0
    assert count == b * c * h * w - c  # the zero vector on background
    f = torch.from_numpy(feats)
    got = lorm_loss(f, lorm(f, torch.from_numpy(pseudo)))
    assert got.item() == pytest.approx(total / count, rel=1e-6)
    # lorm_scope=foreground: only the pseudo-label's foreground positions count
    where = LoRM.foreground(torch.from_numpy(pseudo), (h, w))
    assert where[:, 0].numpy().tolist() == mask.tolist()
    got = lorm_loss(f, lorm(f, torch.from_numpy(pseudo)), where)
    assert fg_count == mask.sum() * c and got.item() == pytest.approx(fg_total / fg_count, rel=1e-6)


def test_cam_partial_ce_is_partial_ce_with_a_constant_background_logit():
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(1, 2, 2, 2, generator=g)  # C−1 = 2 class maps
    scribble = torch.tensor([[[0, 1], [2, 255]]])
    z = maps.double().numpy()
    total = 0.0
    for (y, x), t in (((0, 0), 0), ((0, 1), 1), ((1, 0), 2)):
        lp = np_log_softmax(np.array([0.0, z[0, 0, y, x], z[0, 1, y, x]]))
        total += -lp[t]
    assert cam_partial_ce(maps, scribble).item() == pytest.approx(total / 3, rel=1e-5)
    shifted = cam_partial_ce(maps, scribble, background_logit=1.0).item()
    assert shifted != pytest.approx(total / 3)


def test_lorm_cosine_distance_is_one_minus_cosine_over_the_given_positions_and_blind_to_scale():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    r = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    where = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    where[0, 0, 1, :] = True
    where[1, 0, 2, 2] = True
    want = np.mean([1 - np.dot(f[b, :, y, x].numpy(), r[b, :, y, x].numpy())
                    / (np.linalg.norm(f[b, :, y, x].numpy()) * np.linalg.norm(r[b, :, y, x].numpy()))
                    for b, y, x in [(0, 1, 0), (0, 1, 1), (0, 1, 2), (1, 2, 2)]])
    got = lorm_loss(f, r, where, "cosine")
    assert got.item() == pytest.approx(want, rel=1e-6)
    # shrinking F and F' together leaves it unchanged; the squared distance falls with the square
    assert lorm_loss(0.1 * f, 0.1 * r, where, "cosine").item() == pytest.approx(want, rel=1e-6)
    assert lorm_loss(0.1 * f, 0.1 * r, where).item() == pytest.approx(0.01 * lorm_loss(f, r, where).item())
    # F' parallel to F costs nothing, whatever γ is
    assert lorm_loss(f, 3.0 * f, where, "cosine").item() == pytest.approx(0.0, abs=1e-12)
    # no foreground at all: 0, not NaN
    assert lorm_loss(f, r, torch.zeros_like(where), "cosine").item() == 0.0
    with pytest.raises(ValueError, match="needs the positions"):
        lorm_loss(f, r, None, "cosine")


def test_lorm_cosine_distance_trains_the_features_and_lorm():
    lorm = LoRM(6, temperature=0.1)
    feats = torch.randn(2, 6, 4, 4, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 8, 8))
    loss = lorm_loss(feats, lorm(feats, pseudo), LoRM.foreground(pseudo, (4, 4)), "cosine")
    loss.backward()
    assert loss.item() > 0 and feats.grad.abs().sum() > 0
    assert lorm.query.weight.grad.abs().sum() > 0 and lorm.key.weight.grad.abs().sum() > 0
