"""The champion under concurrency (registry.promote_if_better and its convergence): promoters of the
same model racing in real processes, through the session's real `mlflow server` on 127.0.0.1 (as
pipeline pods do) or in one embedded SQLite store (as local runs do), never leave the worse model
as champion, nor a vetoed one; and the claims that count and do not, step by step, in one process."""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cdsp_core import registry

ROUNDS = 10
LOCAL_ROUNDS = 5
SPLIT = "val-race"
VETO = "the model predicts a single class: background on every pixel"
# (mIoU, veto) of the racers: a better and a worse new model, and a vetoed one that scores highest
RACERS = ((0.80, ""), (0.70, ""), (0.95, VETO))


def racer(barrier, jobs, results) -> None:
    """One promoter process: for each round, wait for the others, then promote its version."""
    while (job := jobs.get()) is not None:
        name, version, miou, veto, delay = job
        registry.MODEL_NAME = name
        barrier.wait()
        time.sleep(delay)  # a few ms apart: other interleavings than all-at-once
        try:
            decision = registry.promote_if_better(version, miou, val_split=SPLIT, veto=veto)
            results.put((version, decision["promoted"], ""))
        except Exception as e:  # reported to the test, which fails on it
            results.put((version, None, repr(e)))


def new_model(client, prefix: str, versions: int) -> tuple[str, list[str]]:
    """A registered model of its own with `versions` versions (of one run; nothing is exported)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    exp = client.create_experiment(name)
    run_id = client.create_run(exp).info.run_id
    client.create_registered_model(name)
    made = [client.create_model_version(name, f"runs:/{run_id}/segmenter", run_id=run_id).version
            for _ in range(versions)]
    return name, [str(v) for v in made]


def race(client, monkeypatch, rounds: int) -> list:
    """`rounds` rounds of RACERS promoting at once after a champion of 0.5; the rounds that went wrong."""
    ctx = multiprocessing.get_context("spawn")  # clean processes: no forked MLflow connections
    barrier = ctx.Barrier(len(RACERS))
    jobs = [ctx.Queue() for _ in RACERS]
    results = ctx.Queue()
    procs = [ctx.Process(target=racer, args=(barrier, q, results), daemon=True) for q in jobs]
    for p in procs:
        p.start()
    rng = random.Random(26)
    wrong = []
    try:
        for r in range(rounds):
            name, (old, *new) = new_model(client, "race", 1 + len(RACERS))
            monkeypatch.setattr(registry, "MODEL_NAME", name)
            assert registry.promote_if_better(old, 0.5, val_split=SPLIT)["promoted"]
            for q, version, (miou, veto) in zip(jobs, new, RACERS):
                q.put((name, version, miou, veto, rng.choice((0.0, 0.0, 0.005, 0.02))))
            got = {}
            for _ in RACERS:
                version, promoted, error = results.get(timeout=120)
                assert not error, f"round {r}, version {version}: {error}"
                got[version] = promoted
            champion = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
            # the better one ends as champion and says so, in its description too, and no other one
            # does; the vetoed one never says promoted
            said = [v for v in [old, *new] if client.get_model_version(name, v).description.startswith("**Champion**")]
            if champion != new[0] or got[new[0]] is not True or got[new[2]] is not False or said != [new[0]]:
                wrong.append((r, champion, got, said))
    finally:
        for q in jobs:
            q.put(None)
        for p in procs:
            p.join(timeout=30)
    return wrong


def test_racing_promoters_never_leave_the_worse_model_as_champion(mlflow_env, monkeypatch):
    """Pipelines: pods promoting through one tracking server."""
    wrong = race(mlflow_env, monkeypatch, ROUNDS)
    assert not wrong, f"the champion was not the best version in {len(wrong)} of {ROUNDS} rounds: {wrong}"


@pytest.mark.slow  # real promoter processes
def test_racing_promoters_on_the_local_store(tmp_path, monkeypatch):
    """Local runs: processes promoting in the embedded SQLite store, no server."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    wrong = race(MlflowClient(uri, registry_uri=uri), monkeypatch, LOCAL_ROUNDS)
    assert not wrong, f"the champion was not the best version in {len(wrong)} of {LOCAL_ROUNDS} rounds: {wrong}"


def test_a_claim_of_the_same_moment_wins_over_a_worse_promotion(mlflow_env, monkeypatch):
    """A promoter that set the alias and then lost it to a racer's stale write (and died before its
    next pass): the next promoter's convergence gives the alias back to the better claim."""
    client = mlflow_env
    name, (old, better, vetoed, nan, worse) = new_model(client, "claim", 5)
    monkeypatch.setattr(registry, "MODEL_NAME", name)
    registry.promote_if_better(old, 0.5, val_split=SPLIT)
    assert registry.promote_if_better(better, 0.8, val_split=SPLIT)["promoted"]
    client.set_registered_model_alias(name, registry.CHAMPION, old)  # the racer's stale write
    assert not registry.promote_if_better(vetoed, 0.99, val_split=SPLIT, veto=VETO)["promoted"]
    assert not registry.promote_if_better(nan, float("nan"), val_split=SPLIT)["promoted"]
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == old  # neither claims

    decision = registry.promote_if_better(worse, 0.7, val_split=SPLIT)
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == better
    assert not decision["promoted"] and decision["champion_version"] == better
    assert decision["reason"] == (f"mIoU 0.7000 does not beat version {better} (0.8000) on val split {SPLIT}, "
                                  "promoted at the same time")
    mv = client.get_model_version(name, worse)
    assert mv.tags[registry.TAG_DECISION] == "kept" and "promoted at the same time" in mv.description
    assert mv.description.startswith(f"Not the champion (version {better} is)")
    assert client.get_model_version(name, better).description.startswith("**Champion**")
    assert client.get_model_version(name, old).description.startswith(f"Not the champion (version {better} is)")


def test_claims_that_do_not_count(mlflow_env, monkeypatch):
    """An expired claim (a champion rolled back by hand stays rolled back), a claim on another val
    split, and one of no finite mIoU are never elected."""
    client = mlflow_env
    name, (old, expired, other_split, unscored, new) = new_model(client, "noclaim", 5)
    monkeypatch.setattr(registry, "MODEL_NAME", name)
    registry.promote_if_better(old, 0.5, val_split=SPLIT)
    assert registry.promote_if_better(expired, 0.8, val_split=SPLIT)["promoted"]
    client.set_registered_model_alias(name, registry.CHAMPION, old)  # rolled back by hand
    long_ago = datetime.now(timezone.utc) - timedelta(seconds=registry.CLAIM_TTL_S + 60)
    client.set_model_version_tag(name, expired, registry.TAG_CLAIM, long_ago.isoformat())
    now = datetime.now(timezone.utc).isoformat()
    for version, miou, split in ((other_split, "0.900000", "val-other"), (unscored, "nan", SPLIT)):
        for k, v in {registry.TAG_MIOU: miou, registry.TAG_VAL_SPLIT: split, registry.TAG_DECISION: "promoted",
                     registry.TAG_CLAIM: now}.items():
            client.set_model_version_tag(name, version, k, v)

    decision = registry.promote_if_better(new, 0.6, val_split=SPLIT)
    assert decision["promoted"] and decision["champion_version"] == old
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == new


def test_a_champion_replaced_meanwhile_is_not_credited_with_the_old_ones_score(mlflow_env, monkeypatch):
    """The evaluate step measures the champion it read on its own val split; when another promotion
    replaced that champion meanwhile, the number is not the new champion's, which is compared by its
    own score instead and keeps its tags."""
    client = mlflow_env
    name, (old, first, second) = new_model(client, "stale", 3)
    monkeypatch.setattr(registry, "MODEL_NAME", name)
    registry.promote_if_better(old, 0.5, val_split="val-1")
    measured = registry.champion_info()["version"]  # both evaluations read it, and score it 0.45 on val-2
    assert registry.promote_if_better(first, 0.7, val_split="val-2", champion_miou=0.45,
                                      champion_version=measured)["promoted"]
    decision = registry.promote_if_better(second, 0.6, val_split="val-2", champion_miou=0.45,
                                          champion_version=measured)
    assert not decision["promoted"] and decision["champion_miou"] == 0.7
    assert decision["reason"] == f"mIoU 0.6000 does not beat champion version {first} (0.7000) on val split val-2"
    tags = client.get_model_version(name, first).tags
    assert tags[registry.TAG_MIOU] == "0.700000" and registry.TAG_RESCORED not in tags
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == first
