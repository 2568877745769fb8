"""The MLflow model registry: the segmenter logged and registered as `cdsp-segmenter`, the
`champion` alias and the policy that moves it, and registered models back as local folders.

    version = registry.log_segmenter(model_dir)    # inside tracking.stage_run(...): logged, registered
    decision = registry.promote_if_better(version, miou, val_split=registry.val_split_id(manifest))
    folder = registry.resolve_model("models:/cdsp-segmenter@champion")   # downloaded once, cached

A version's description is written from its tags and the alias (`describe_version`), every
time either changes, so the two always agree. Evaluations promoting at the same moment (pods
through one tracking server, or processes on one local store) end with the best of them as
champion: the shared state is in MLflow itself (`_converge`). A retry registers nothing new: a
model version is found again by its run. Reading or writing
the registry when the server is unreachable raises a CdspError naming the server and what was
not recorded (tracking.recording).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from cdsp_core import modelfolder, tracking
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_dir
from cdsp_core.tracking import TAG_CODE_VERSION, TAG_FINGERPRINT, TAG_PIPELINE_RUN

log = logging.getLogger(__name__)

MODEL_NAME = "cdsp-segmenter"
CHAMPION = "champion"

# tags of model versions (and of the evaluation run that decided)
TAG_SOURCE_RUN = "cdsp.source_run_id"
TAG_SOURCE_RUN_NAME = "cdsp.source_run_name"  # what MLflow's runs table calls that run
TAG_MIOU = "cdsp.miou"
TAG_VAL_SPLIT = "cdsp.val_split"
TAG_DECISION = "cdsp.promotion"
TAG_REASON = "cdsp.promotion_reason"
TAG_RESCORED = "cdsp.rescored"  # the champion measured again on a newer val split: when, and what it was before
TAG_CLAIM = "cdsp.champion_claim"  # when the version beat the champion it saw (UTC, ISO 8601): see _converge
CLAIM_TTL_S = 600.0  # how long a claim counts for other promoters; a promoter's passes take seconds
MAX_PASSES = 20
MODEL_DESCRIPTION = (
    "CDSP scribble-supervised semantic segmenter (DeepLab), one version per trained model, logged by the "
    "pipeline's train_segmenter stage in the pickle-free torch.export format (N×3×H×W float images in, "
    "N×C×H×W logits out). The alias `champion` is the version with the best val mIoU (a fraction in [0, 1]) "
    "on the same val split; it moves only when a new model beats it. Each version's description and tags say "
    "its mIoU, why it was or was not promoted, and the run that trained it. Use it with "
    "`cdsp predict --model models:/cdsp-segmenter@champion` (or `models:/cdsp-segmenter/<version>`).")
# the files of a model folder that ride along with the logged model (what resolve_model gives back)
FOLDER_FILES = (modelfolder.WEIGHTS, modelfolder.CONFIG, modelfolder.HISTORY)


def _logits_only(model):
    """Our segmenters return {"out": logits, ...}; the logged model returns the logits tensor."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return out["out"] if isinstance(out, dict) else out

    return Logits(model).eval()


def log_segmenter(model_dir: str | os.PathLike, run_id: str | None = None, *, model=None,
                  input_size: int = 64) -> str:
    """Log the segmenter of `model_dir` with `mlflow.pytorch` and register it as `cdsp-segmenter`.

    The logged model is pickle-free (`torch.export`, 'pt2'), with a signature (N×3×H×W float
    images -> N×C×H×W logits) and an input example; the model folder's `model.pt`,
    `config.json` and `history.json` ride along as extra files, which is what `resolve_model`
    gives back. `model` defaults to the network rebuilt from the folder. A retry returns the
    version already registered for this run. Returns the version number (a string).
    """
    import numpy as np

    run_id = tracking.run_or_active(run_id)
    folder = Path(model_dir)
    client = tracking.mlflow_client()
    with tracking.recording(f"the segmenter of run {run_id}"):
        done = client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")
        if done:
            version = str(max(int(v.version) for v in done))
            log.info("MLflow: run %s already registered %s version %s", run_id, MODEL_NAME, version)
            return version
        run = client.get_run(run_id)
    if model is None:
        model, info = modelfolder.load(folder, "cpu", kind="segmenter")
        n_classes = len(info["class_names"])
    else:
        n_classes = None
    net = _logits_only(model)
    example = np.zeros((2, 3, input_size, input_size), dtype=np.float32)
    if n_classes is None:
        import torch

        with torch.no_grad():
            n_classes = int(net(torch.from_numpy(example)).shape[1])
    if not (folder / modelfolder.WEIGHTS).is_file():
        raise CdspError(f"{folder / modelfolder.WEIGHTS}: missing; log the segmenter after training wrote it")
    extra = [str(folder / f) for f in FOLDER_FILES if (folder / f).is_file()]

    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),  # unnamed: one tensor in
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes, -1, -1))]))
    version_tags = {TAG_SOURCE_RUN: run_id, TAG_SOURCE_RUN_NAME: run.info.run_name or "",
                    TAG_CODE_VERSION: tracking.code_version(),
                    TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, ""),
                    TAG_PIPELINE_RUN: run.data.tags.get(TAG_PIPELINE_RUN, "")}
    with tracking.recording(f"the segmenter of run {run_id}"):
        mlflow.set_experiment(experiment_id=run.info.experiment_id)  # where log_model files the model
        info = mlflow.pytorch.log_model(
            net, name="segmenter", run_id=run_id, signature=signature, input_example=example,
            extra_files=extra, pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            registered_model_name=MODEL_NAME, serialization_format="pt2")
        version = str(info.registered_model_version)
        for k, v in version_tags.items():
            if v:
                client.set_model_version_tag(MODEL_NAME, version, k, v)
        for f in extra:  # the config and history also on the run's own artifact page
            if Path(f).name != modelfolder.WEIGHTS:
                client.log_artifact(run_id, f)
        if client.get_registered_model(MODEL_NAME).description != MODEL_DESCRIPTION:
            client.update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
        describe_version(client, version)
    log.info("MLflow: registered %s version %s from run %s", MODEL_NAME, version, run_id)
    return version


def val_split_id(manifest: dict) -> str:
    """A hash of the val split a manifest describes (ids, images, ground truth): mIoUs compare
    only between evaluations on equal ids."""
    lines = sorted(f"{im['id']}:{im.get('sha256', {}).get('image', '')}:{im.get('sha256', {}).get('gt', '')}"
                   for im in manifest.get("images", []) if im.get("split") == "val")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16] if lines else ""


def _champion(client):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException as e:
        if tracking.not_found(e):
            return None
        raise


def promote_if_better(version: str, miou: float, *, val_split: str, fingerprint: str = "",
                      run_id: str | None = None, champion_miou: float | None = None,
                      champion_version: str | None = None, veto: str = "") -> dict:
    """Move the alias `champion` to `version` only if its mIoU beats the champion's on the same val split.

    The comparison needs both mIoUs on the same split (`val_split`, e.g. `val_split_id(manifest)`):
    a champion evaluated on another split is kept unless `champion_miou` (the champion
    re-evaluated on this split) is given; given `champion_version` too (the version it was
    measured for), a champion that changed meanwhile is not credited with it. A `veto` (e.g.
    `evaluate.promotion_veto(metrics)`: the model predicts a single class) keeps the champion
    whatever the mIoU. The decision and its reason are written on the version (tags, and the
    description rewritten from them by `describe_version`, as is the one of a champion re-scored
    or replaced; evaluated again as the champion, a version keeps its first reason) and, given
    `run_id` (default: the open stage run, if any), on that run.

    Promoters racing on the model end with the best of them as champion: a version that beats
    the champion claims the alias and `_converge`s with the claims of the moment; when another
    claim wins, this version is "kept" ("does not beat version N ..., promoted at the same
    time"). Returns {"promoted", "reason", "version", "miou", "champion_version", "champion_miou"}.
    """
    version = str(version)
    client = tracking.mlflow_client()
    with tracking.recording(f"the champion decision for {MODEL_NAME} version {version}"):
        mine = client.get_model_version(MODEL_NAME, version)  # exists?
        tags = {TAG_MIOU: f"{miou:.6f}", TAG_VAL_SPLIT: val_split}
        if fingerprint:
            tags[TAG_FINGERPRINT] = fingerprint
        for k, v in tags.items():
            client.set_model_version_tag(MODEL_NAME, version, k, v)
        champ = _champion(client)
        champ_version = _version(champ)
        if champion_version is not None and str(champion_version) != champ_version:
            champion_miou = None  # measured for a champion replaced since: not this one's score
        champ_miou = champion_miou
        if champ is not None and champ_miou is None and champ.tags.get(TAG_VAL_SPLIT) == val_split:
            champ_miou = _score(champ)
        promoted, reason = _decide(version, miou, val_split, veto, champ, champ_miou)
        if champ is not None and champion_miou is not None and champ_version != version:
            _rescore(client, champ, champion_miou, val_split, version)
        keep_why = champ_version == version and mine.tags.get(TAG_DECISION) == "promoted"  # a retry keeps the first
        if not keep_why:
            _set_decision(client, version, promoted, reason)
        touched = {version, champ_version}
        if promoted and champ_version != version:  # claim the alias, after every tag rivals compare by
            client.set_model_version_tag(MODEL_NAME, version, TAG_CLAIM, _utc_now())
            final, seen = _converge(client, val_split)
            touched |= seen
            if final is not None and str(final.version) != version:  # a rival of the same moment won
                promoted, champ_version, champ_miou = False, str(final.version), _score(final)
                reason = _lost(miou, final, val_split)
                _set_decision(client, version, promoted, reason)
        for v in sorted(x for x in touched if x):  # the alias or a tag of each may have changed
            describe_version(client, v)
        run_id = run_id or tracking.open_run_id()
        if run_id:
            tracking.set_tags(client, run_id, {TAG_DECISION: "promoted" if promoted else "kept", TAG_REASON: reason,
                                       "cdsp.model_version": version})
    log.info("MLflow: %s version %s %s: %s", MODEL_NAME, version, "promoted to champion" if promoted else "kept",
             reason)
    return {"promoted": promoted, "reason": reason, "version": version, "miou": miou,
            "champion_version": champ_version, "champion_miou": champ_miou}


def _decide(version: str, miou: float, val_split: str, veto: str, champ, champ_miou: float | None) -> tuple[bool, str]:
    """Whether `version` (mIoU `miou` on `val_split`) beats the champion `champ` (mIoU `champ_miou`
    on that split, None when not measured there), and why."""
    champ_version = _version(champ)
    if not math.isfinite(miou):
        return False, f"mIoU {miou} is not a number"
    if veto:
        return False, f"{veto} (mIoU {miou:.4f}): not a usable segmenter"
    if champ is None:
        return True, f"no champion yet; mIoU {miou:.4f} on val split {val_split}"
    if champ_version == version:
        return True, f"version {version} is already the champion"
    if champ_miou is None or not math.isfinite(champ_miou):
        return False, (f"champion version {champ_version} was evaluated on val split "
                       f"{champ.tags.get(TAG_VAL_SPLIT) or '?'}, this model on {val_split}: not comparable; "
                       "re-evaluate the champion on this split and pass champion_miou")
    if miou > champ_miou:
        return True, (f"mIoU {miou:.4f} beats champion version {champ_version} ({champ_miou:.4f}) "
                      f"on val split {val_split}")
    return False, (f"mIoU {miou:.4f} does not beat champion version {champ_version} ({champ_miou:.4f}) "
                   f"on val split {val_split}")


def _lost(miou: float, winner, val_split: str) -> str:
    """Why a version that claimed the alias is not the champion after `_converge`."""
    if winner.tags.get(TAG_VAL_SPLIT) != val_split:
        return (f"version {winner.version}, evaluated on val split {winner.tags.get(TAG_VAL_SPLIT) or '?'}, "
                f"became the champion at the same time: not comparable with this model's {val_split}")
    return (f"mIoU {miou:.4f} does not beat version {winner.version} ({_score(winner):.4f}) on val split "
            f"{val_split}, promoted at the same time")


def _rescore(client, champ, champion_miou: float, val_split: str, version: str) -> None:
    """The champion measured again on this split: record it, so the next run compares directly."""
    before = champ.tags.get(TAG_MIOU)
    was = f"{float(before):.4f} on val split {champ.tags.get(TAG_VAL_SPLIT) or '?'}" if before else "unscored"
    rescored = {TAG_MIOU: f"{champion_miou:.6f}", TAG_VAL_SPLIT: val_split,
                TAG_RESCORED: f"measured again on val split {val_split} when version {version} was "
                              f"evaluated: {champion_miou:.4f} (was {was})"}
    for k, v in rescored.items():
        client.set_model_version_tag(MODEL_NAME, str(champ.version), k, v)


def _set_decision(client, version: str, promoted: bool, reason: str) -> None:
    client.set_model_version_tag(MODEL_NAME, version, TAG_DECISION, "promoted" if promoted else "kept")
    client.set_model_version_tag(MODEL_NAME, version, TAG_REASON, reason)


def _converge(client, val_split: str) -> tuple[object | None, set[str]]:
    """Move the alias to the best version claiming it on `val_split`, until it stays: the
    compare-and-retry that makes promoters racing on one model end with the best one.

    MLflow has no compare-and-set on an alias, so the last writer wins; what makes the last
    write right is the order. A promoter writes its version's mIoU, split, decision and claim
    (`TAG_CLAIM`, the time) before its first pass; a pass reads the alias, then the claims
    (`_claims`: decided "promoted" on this split, finite mIoU, claimed in the last
    CLAIM_TTL_S), and sets the alias to the best of them and the champion (`_best`) unless the
    alias already is that one; the promoter stops after a pass that writes nothing. Say the last
    alias write happens at time T, by promoter P, and leaves X. P's final pass reads the alias
    (X) and the claims after T and found X best. The best claim B was written either before
    that read, so P saw it and X is at least as good, or after it, hence after T: then B's own
    promoter, whose passes all come after its claim, read X and B and stopped, so again X is at
    least as good. A version vetoed, not finite, kept or on another split never claims, so no
    pass elects it; a champion on another split is not comparable and stays (as in
    `promote_if_better`). Reading the alias before the claims makes the passes end: a promoter
    that sees another's write also sees every claim that writer saw. This holds while each
    promoter's passes end within CLAIM_TTL_S of its claim and the promoters' clocks agree
    within it; nothing is held, so a killed promoter blocks no one (its claim counts for the
    promotions of the next CLAIM_TTL_S). Returns the champion and the versions seen (whose
    descriptions may need rewriting).
    """
    seen: set[str] = set()
    for _ in range(MAX_PASSES):
        champ = _champion(client)
        claims = _claims(client, val_split)
        seen |= {str(v.version) for v in claims} | {_version(champ)} - {None}
        best = _best(champ, claims, val_split)
        if best is None or str(best.version) == _version(champ):
            return champ, seen
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(best.version))
    log.warning("MLflow: the %s alias of %s still moved after %d passes (promotions keep arriving); "
                "the last promoter settles it", CHAMPION, MODEL_NAME, MAX_PASSES)
    return _champion(client), seen


def _claims(client, val_split: str) -> list:
    """The versions that beat the champion they saw on `val_split` in the last CLAIM_TTL_S."""
    found = client.search_model_versions(f"name='{MODEL_NAME}' and tags.`{TAG_DECISION}` = 'promoted'")
    now = time.time()
    return [v for v in found if v.tags.get(TAG_VAL_SPLIT) == val_split and math.isfinite(_score(v))
            and abs(now - _claimed_at(v)) <= CLAIM_TTL_S]


def _best(champ, claims: list, val_split: str):
    """The version the alias should name: the best of the champion and the claims on `val_split`
    (a tie keeps the champion, else the earliest version); a champion on another split, or
    unscored on this one, stays."""
    if champ is not None and (champ.tags.get(TAG_VAL_SPLIT) != val_split or not math.isfinite(_score(champ))):
        return champ
    pool = ([champ] if champ is not None else []) + claims
    return max(pool, key=lambda v: (_score(v), str(v.version) == _version(champ), -int(v.version)), default=None)


def _version(mv) -> str | None:
    return str(mv.version) if mv is not None else None


def _score(mv) -> float:
    """A version's mIoU tag (NaN when absent or not a number)."""
    try:
        return float(mv.tags.get(TAG_MIOU, "nan"))
    except ValueError:
        return math.nan


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _claimed_at(mv) -> float:
    """When a version claimed the alias (Unix time; -inf when it did not, or the tag is unreadable)."""
    try:
        return datetime.fromisoformat(mv.tags.get(TAG_CLAIM, "")).timestamp()
    except ValueError:
        return -math.inf


def describe_version(client, version: str) -> str:
    """Write the description of model version `version` from its tags and the alias, which it
    therefore never contradicts: champion or not, its mIoU and val split, the promotion decision
    and its reason, a re-scoring, and the run that trained it (by name). Returns the text.

    The alias is read again after writing, and the text rewritten if it moved meanwhile: so
    the last text written agrees with the alias at that moment, and whoever moves the alias
    later describes this version again if it is the champion before or after (`_converge`)."""
    for _ in range(MAX_PASSES):
        mv = client.get_model_version(MODEL_NAME, str(version))
        champ = _champion(client)
        text = _description(mv, _version(champ))
        if mv.description == text:
            return text
        client.update_model_version(MODEL_NAME, str(version), description=text)
        after = _champion(client)
        if _version(after) == _version(champ):
            return text
    return text


def _description(mv, champ_version: str | None) -> str:
    """The description of model version `mv` when `champ_version` is the champion (Markdown)."""
    tags = mv.tags
    if TAG_MIOU not in tags:
        state = "Not evaluated yet."
    else:
        role = "**Champion**" if champ_version == str(mv.version) else (
            f"Not the champion (version {champ_version} is)" if champ_version else "Not the champion")
        state = f"{role}: mIoU {float(tags[TAG_MIOU]):.4f} on val split {tags.get(TAG_VAL_SPLIT) or '?'}."
    lines = [state]
    if tags.get(TAG_REASON):
        lines.append(f"{'Promoted' if tags.get(TAG_DECISION) == 'promoted' else 'Not promoted'} when evaluated: "
                     f"{tags[TAG_REASON]}.")
    if tags.get(TAG_RESCORED):
        lines.append(f"Re-scored: {tags[TAG_RESCORED]}.")
    source = f"`{tags[TAG_SOURCE_RUN_NAME]}` ({mv.run_id})" if tags.get(TAG_SOURCE_RUN_NAME) else f"{mv.run_id}"
    extra = [f"pipeline run {tags[TAG_PIPELINE_RUN]}" if tags.get(TAG_PIPELINE_RUN) else "",
             f"data fingerprint {tags[TAG_FINGERPRINT][:16]}" if tags.get(TAG_FINGERPRINT) else "",
             f"code {tags[TAG_CODE_VERSION]}" if tags.get(TAG_CODE_VERSION) else ""]
    lines.append(f"Trained by run {source}" + "".join(f", {e}" for e in extra if e) + ".")
    return "\n\n".join(lines)  # Markdown paragraphs, as MLflow's UI renders descriptions


def champion_info() -> dict | None:
    """The current champion: {"version", "run_id", "fingerprint", "miou", "val_split",
    "pipeline_run_id", "uri"}, or None when there is none yet."""
    client = tracking.mlflow_client()
    with tracking.recording(f"(reading) the {CHAMPION} of {MODEL_NAME}"):
        champ = _champion(client)
    if champ is None:
        return None
    miou = champ.tags.get(TAG_MIOU)
    return {"version": str(champ.version), "run_id": champ.run_id, "fingerprint": champ.tags.get(TAG_FINGERPRINT),
            "miou": float(miou) if miou else None, "val_split": champ.tags.get(TAG_VAL_SPLIT),
            "pipeline_run_id": champ.tags.get(TAG_PIPELINE_RUN), "uri": f"models:/{MODEL_NAME}@{CHAMPION}"}


def resolve_model(uri: str, dest: str | os.PathLike | None = None) -> str:
    """A local model folder (`model.pt`, `config.json`, ...) for `models:/<name>@<alias>` or
    `models:/<name>/<version>`, as `cdsp predict` and `cdsp evaluate` take it.

    Downloaded once into `dest` (default: a cache under `CDSP_CACHE_DIR`, else ~/.cache/cdsp,
    keyed by the logged model's id), atomically. Nothing is unpickled: the folder's weights are
    loaded with `torch.load(weights_only=True)`.
    """
    import mlflow

    m = re.fullmatch(r"models:/([^/@]+)(?:@([A-Za-z0-9_-]+)|/(\d+))", uri)
    if not m:
        raise CdspError(f"{uri}: not a registered model URI (models:/<name>@<alias> or models:/<name>/<version>)")
    name, alias, number = m.groups()
    client = tracking.mlflow_client()
    with tracking.recording(f"(reading) {uri}"):
        from mlflow.exceptions import MlflowException

        try:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        except MlflowException as e:
            if tracking.not_found(e):
                raise CdspError(f"{uri}: no such registered model version in MLflow at "
                                f"{redact(tracking.tracking_uri())}") from e
            raise
        model_id = mv.source.rsplit("/", 1)[-1] if mv.source.startswith("models:/") else ""
        location = client.get_logged_model(model_id).artifact_location if model_id else mv.source
    cache = Path(os.environ.get("CDSP_CACHE_DIR") or Path.home() / ".cache" / "cdsp") / "models"
    target = Path(dest) if dest else cache / f"{tracking.snake(name)}-v{mv.version}-{model_id or mv.run_id}"
    if (target / modelfolder.WEIGHTS).is_file() and (target / modelfolder.CONFIG).is_file():
        return str(target)
    with tracking.recording(f"(downloading) {uri}"), atomic_dir(target) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/extra_files", dst_path=str(tmp)))
        for f in got.iterdir():
            f.rename(tmp / f.name)
        got.rmdir()
    if not (target / modelfolder.WEIGHTS).is_file():
        raise CdspError(f"{uri}: version {mv.version} has no {modelfolder.WEIGHTS} (not logged by "
                        "registry.log_segmenter)")
    log.info("MLflow: %s is version %s, in %s", uri, mv.version, target)
    return str(target)
