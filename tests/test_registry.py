"""registry: the segmenter logged and registered, the champion alias moved only by a better mIoU on
the same val split, and registered models back as local folders, against the session's real
`mlflow server` (SQLite backend) on 127.0.0.1."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from PIL import Image
from torch import nn

from cdsp_core import registry, tracking
from cdsp_core.errors import CdspError


def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


class TinySegmenter(nn.Module):
    """Stands in for DeepLab: same {"out": logits} output, a few hundred weights."""

    def __init__(self, n_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, n_classes, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(x)}


def model_folder(path, seed: int):
    torch.manual_seed(seed)
    model = TinySegmenter()
    path.mkdir(parents=True)
    torch.save(model.state_dict(), path / "model.pt")
    (path / "config.json").write_text(json.dumps({"kind": "segmenter", "class_names": ["background", "cat"]}))
    (path / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.5}]))
    return model, path


def real_model_folder(path):
    """A DeepLab-v2 (ResNet-18) folder as `cdsp train-seg` writes it, rebuilt from it by modelfolder.load."""
    from cdsp_core import models

    torch.manual_seed(1)
    net = models.build_segmenter("deeplabv2", "resnet18", 2)
    path.mkdir(parents=True)
    torch.save(net.state_dict(), path / "model.pt")
    (path / "config.json").write_text(json.dumps({"kind": "segmenter", "segmenter": "deeplabv2",
                                                  "backbone": "resnet18", "class_names": ["background", "cat"]}))
    (path / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.7}]))
    return net, path


def test_registry_promotion_both_ways_and_resolve(mlflow_env, tmp_path, monkeypatch):
    client = mlflow_env
    name = f"cdsp-segmenter-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(registry, "MODEL_NAME", name)
    exp = experiment()
    assert registry.champion_info() is None
    versions, weights = [], []
    for i, (fingerprint, miou) in enumerate([("fp-a", 0.50), ("fp-b", 0.40)]):
        parent = tracking.start_pipeline_run(f"kfp-reg-{i}-{uuid.uuid4().hex[:4]}", experiment=exp,
                                             fingerprint=fingerprint, run_name=f"nightly {i}")
        if i == 0:  # a tiny stand-in, logged as given
            model, folder = model_folder(tmp_path / f"model{i}", seed=i)
        else:  # the real thing, rebuilt from its folder (model=None) and exported
            model, folder = real_model_folder(tmp_path / f"model{i}")
        with tracking.stage_run(parent, "train_segmenter") as run_id:
            version = registry.log_segmenter(folder, model=model if i == 0 else None)
            assert registry.log_segmenter(folder) == version  # a retry registers nothing new
        assert len(client.search_model_versions(f"name='{name}' and run_id='{run_id}'")) == 1
        mv = client.get_model_version(name, version)  # the source run by the name people read
        assert mv.tags[registry.TAG_SOURCE_RUN_NAME] == f"nightly {i} / train_segmenter"
        assert mv.description.startswith("Not evaluated yet.") and f"`nightly {i} / train_segmenter`" in \
            mv.description
        assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "history.json"}
        versions.append(version)
        weights.append(model.state_dict())
        with tracking.stage_run(parent, "evaluate"):
            decision = registry.promote_if_better(version, miou, val_split="val-1")
        if i == 0:
            assert decision["promoted"] and "no champion yet" in decision["reason"]
        else:  # worse: the alias stays, and the version says why
            assert not decision["promoted"] and decision["champion_version"] == versions[0]
            assert "0.4000 does not beat champion version 1 (0.5000)" in decision["reason"]
            mv = client.get_model_version(name, version)
            assert mv.tags[registry.TAG_DECISION] == "kept" and "does not beat" in mv.description
    assert versions == ["1", "2"]
    assert client.get_registered_model(name).description == registry.MODEL_DESCRIPTION
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    # Evaluated again (say, after a fix to the evaluation), version 2 now beats the champion.
    decision = registry.promote_if_better("2", 0.60, val_split="val-1", fingerprint="fp-b")
    assert decision["promoted"] and "0.6000 beats champion version 1 (0.5000)" in decision["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version(name, "2").tags[registry.TAG_DECISION] == "promoted"

    info = registry.champion_info()
    assert info["version"] == "2" and info["fingerprint"] == "fp-b" and info["miou"] == pytest.approx(0.6)
    again = registry.promote_if_better("2", 0.6, val_split="val-1")  # a retried evaluation step
    assert again["promoted"] and "already the champion" in again["reason"]
    other = registry.promote_if_better("1", 0.99, val_split="val-2")
    assert not other["promoted"] and "not comparable" in other["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    # With the champion re-evaluated on val-2 (0.7), version 1's 0.65 there does not beat it.
    other = registry.promote_if_better("1", 0.65, val_split="val-2", champion_miou=0.7)
    assert not other["promoted"] and "0.6500 does not beat champion version 2 (0.7000) on val split val-2" \
        in other["reason"]
    assert registry.champion_info()["val_split"] == "val-2" and registry.champion_info()["miou"] == 0.7
    # Re-scored, the champion's description says what its tags say (and what it was before), and
    # the version it beat says the same as its own tags.
    champion = client.get_model_version(name, "2")
    assert champion.tags[registry.TAG_MIOU] == "0.700000"
    assert champion.description.startswith("**Champion**: mIoU 0.7000 on val split val-2.")
    assert "Re-scored: measured again on val split val-2 when version 1 was evaluated: 0.7000 (was 0.6000 on " \
           "val split val-1)" in champion.description
    assert "0.6000 beats champion version 1 (0.5000)" in champion.description  # why it was promoted, then
    assert client.get_model_version(name, "1").description.startswith(
        "Not the champion (version 2 is): mIoU 0.6500 on val split val-2.")
    # A model that predicts one class is never promoted, whatever its mIoU, and says so.
    vetoed = registry.promote_if_better("1", 0.99, val_split="val-2", veto="the model predicts a single class: "
                                                                          "background on every pixel")
    assert not vetoed["promoted"] and "single class" in vetoed["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert "single class" in client.get_model_version(name, "1").description

    # The logged model: pickle-free, with signature and input example.
    from mlflow.models import get_model_info

    model_info = get_model_info(f"models:/{name}/2")
    assert model_info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert model_info.signature.outputs.inputs[0].shape == (-1, 2, -1, -1)
    assert model_info.saved_input_example_info is not None
    assert "pytorch" in model_info.flavors

    folder = registry.resolve_model(f"models:/{name}@champion")
    state = torch.load(f"{folder}/model.pt", weights_only=True)
    assert all(torch.equal(state[k], weights[1][k]) for k in weights[1])
    assert json.loads(open(f"{folder}/config.json").read())["kind"] == "segmenter"
    assert registry.resolve_model(f"models:/{name}@champion") == folder  # cached
    first = registry.resolve_model(f"models:/{name}/1")
    assert first != folder and torch.equal(torch.load(f"{first}/model.pt", weights_only=True)["conv.weight"],
                                           weights[0]["conv.weight"])
    with pytest.raises(CdspError, match="no such registered model version"):
        registry.resolve_model(f"models:/{name}@nobody")

    # `cdsp predict` takes the registry URI (through evaluate.resolve_model).
    from cdsp_core import cli

    (tmp_path / "images").mkdir()
    for k in range(2):
        Image.new("RGB", (40, 32), (40 * k, 90, 200)).save(tmp_path / "images" / f"im{k}.png")
    out = tmp_path / "pred"
    assert cli.main(["predict", "--model", f"models:/{name}@champion", "--images", str(tmp_path / "images"),
                     "--out", str(out), "--device", "cpu"]) == 0
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == ["im0.png", "im1.png"] and Image.open(out / "labels" / "im0.png").size == (40, 32)
    assert cli.main(["predict", "--model", f"models:/{name}@nobody", "--images", str(tmp_path / "images"),
                     "--out", str(tmp_path / "pred2"), "--device", "cpu"]) == 2
