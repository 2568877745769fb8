"""How far the frozen ImageNet MobileNetV2 features go: a head trained on them alone, fully supervised.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mnv2_probe.py --data build/voc-tune1k --weights W.pth

The backbone (output stride 16, eval mode) is run once over the first `--train` training photos and
the first `--val` val photos at full size, no augmentation; a 1x1 convolution and DeepLab-v2's head
(3x3 at rates 1/2/4/6, summed) are trained on the cached features with AdamW 1e-3, batch 8; val mIoU
after 1, 3, 10 and 30 epochs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cdsp_core import data, evaluate, models
from cdsp_core.transforms import to_normalized_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=150)
    a = p.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    index = data.load_index(a.data)
    n = len(index.classes)
    backbone = models.load_pretrained(models.make_backbone("mobilenet_v2", 16), a.weights).eval()

    def features(items):
        out = []
        for item in items:
            with torch.no_grad():
                f = backbone(to_normalized_tensor(Image.fromarray(data.read_image(item.image)))[None])[1][0]
            out.append((f, torch.from_numpy(data.read_label(item.gt).astype(np.int64))))
        return out

    train, val = features(index.train[:a.train]), features(index.val[:a.val])
    heads = {"1x1": torch.nn.ModuleList([torch.nn.Conv2d(backbone.out_channels, n, 1)]),
             "deeplabv2 1,2,4,6": torch.nn.ModuleList(torch.nn.Conv2d(backbone.out_channels, n, 3, padding=r,
                                                                      dilation=r) for r in (1, 2, 4, 6))}
    for name, head in heads.items():
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        for epoch in range(1, 31):
            order = np.random.permutation(len(train))
            for i in range(0, len(train), 8):
                loss = sum(F.cross_entropy(F.interpolate(sum(c(train[j][0][None]) for c in head),
                                                         size=train[j][1].shape, mode="bilinear"),
                                           train[j][1][None], ignore_index=data.IGNORE) for j in order[i:i + 8])
                opt.zero_grad()
                (loss / 8).backward()
                opt.step()
            if epoch in (1, 3, 10, 30):
                cm = evaluate.ConfusionMatrix(n)
                with torch.no_grad():
                    for f, gt in val:
                        cm.update(gt, F.interpolate(sum(c(f[None]) for c in head), size=gt.shape,
                                                    mode="bilinear")[0].argmax(0))
                print(f"{name}: epoch {epoch}, val mIoU {cm.miou():.3f}", flush=True)


if __name__ == "__main__":
    main()
