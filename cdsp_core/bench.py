"""`cdsp bench`: the ablation of the method page and the scribble-quality robustness, side by side.

    cdsp bench --data DIR --out DIR [--preset cpu|cpu-pretrained|paper] [--seeds N] [--jobs N] [--runs a,b]

Every bench run trains the same segmenter (same backbone, schedule and seeds) with a subset of
the CDSP loss terms, then evaluates it on the val split:

    scribble-only          L_seg (partial CE on the scribbles)
    pseudo-only            L_pseudo
    scribble+pseudo        L_seg + L_pseudo
    scribble+pseudo+lorm   L_seg + L_pseudo + L_lorm
    scribble+pseudo+del    L_seg + L_pseudo + L_ds + L_dc (the full method without LoRM)
    cdsp                   L_seg + L_pseudo + L_lorm + L_ds + L_dc (the full method)
    cdsp-paper-lorm        cdsp with LoRM exactly as the method page has it (all positions,
                           temperature 1), whatever the preset's LoRM settings
    full-supervision       L_seg on the ground-truth masks (the ceiling)
    cdsp-drop0.5, scribble-only-drop0.5, cdsp-shrink0.5, scribble-only-shrink0.5
                           the same on degraded training scribbles (scribbles.degrade_dir)

A term that is on keeps its weight from the config (`--l-pseudo 0.5` applies to every run
that uses L_pseudo). Stage 1 (classifier, CAM pseudo-labels, distance maps) is made once per
scribble set and shared by every run and seed on it. The degraded scribbles feed stage 1 too,
as they would for a user who only has those: the pseudo-labels of a variant come from its
own scribbles (random-walk seeds, scribble distance map, the classifier's scribble CE). The
classifier itself depends on the scribbles only through the image-level labels when
`cls_scribble_ce` is 0, and drop/shrink keep every image's classes, so it is then trained
once and shared (the same network either way); with `cls_scribble_ce` > 0 each scribble set
trains its own.

Output folder:

    bench.json                 settings and the bench id (marks the folder; a rerun resumes)
    data/<variant>/            the training view of each scribble set: the dataset through symlinks,
                               train split only, drop/shrink scribbles for a variant
    stage1/<variant>/          classifier/ and pseudo/ (with the pseudo-labels' mIoU vs ground truth)
    runs/<name>/seed<k>/       model/, eval/, started.json and result.json
    results.json, results.md   {"runs": [{"name", "losses", "scribbles", "miou", "per_class_iou",
                               "seconds", ...}]}, mIoU as fractions, mean and spread over seeds

After stage 1, the (run, seed) trainings are independent: `--jobs N` trains N at a time, each
in a spawned worker process with its share of the CPU threads.

A rerun with the same settings reuses every finished step and resumes an interrupted training
from its checkpoint, so a stopped bench continues where it stopped; a step whose settings
changed is redone. Each (run, seed) is one MLflow run in the experiment `bench_experiment`,
named `<run> · s<seed>` (`cdsp · s0`) and tagged with the bench id: its settings as params, its
training curves (step = epoch; `val_miou` on the first `curve_val_images` val images)
and its results (`miou`, `pixel_acc`, `iou_<class>`, `pseudo_miou`), with the training as the
nested run `cdsp · s0 / train_segmenter`. One more run, `summary · <bench id>`, holds
results.json/results.md and the mean mIoU of every bench run. The bench ends with the address of
MLflow's compare page for its runs (`compare_url`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from cdsp_core import config, data, evaluate, logs, outputs, pseudolabel, report, scribbles, tracking, train
from cdsp_core.config import BenchConfig, ClassifierConfig, EvalConfig, PseudoLabelConfig, SegTrainConfig
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text

log = logging.getLogger("cdsp.bench")

MARKER = "bench.json"
RESULT = "result.json"
STARTED = "started.json"
CDSP = train.LOSS_TERMS  # the full method: every loss term
CLEAN = "clean"
VARIANTS = {"drop0.5": ("drop", 0.5), "shrink0.5": ("shrink", 0.5)}  # scribble variant -> degrade(mode, ratio)


@dataclass(frozen=True)
class Run:
    name: str
    terms: tuple[str, ...]  # the loss terms that are on
    scribbles: str = CLEAN  # CLEAN or a key of VARIANTS
    target: str = "scribble"  # L_seg's target: scribble, or gt for full supervision
    settings: tuple[tuple[str, object], ...] = ()  # SegTrainConfig fields this run sets, whatever the config says


PAPER_LORM = (("lorm_scope", "all"), ("lorm_temperature", 1.0), ("lorm_distance", "squared"))  # the method page's LoRM


RUNS = (
    Run("scribble-only", ("seg",)),
    Run("pseudo-only", ("pseudo",)),
    Run("scribble+pseudo", ("seg", "pseudo")),
    Run("scribble+pseudo+lorm", ("seg", "pseudo", "lorm")),
    Run("scribble+pseudo+del", ("seg", "pseudo", "ds", "dc")),
    Run("cdsp", CDSP),
    Run("cdsp-paper-lorm", CDSP, settings=PAPER_LORM),
    Run("full-supervision", ("seg",), target="gt"),
    *(Run(f"{name}-{variant}", terms, variant) for variant in VARIANTS
      for name, terms in (("cdsp", CDSP), ("scribble-only", ("seg",)))),
)
RUNS_BY_NAME = {r.name: r for r in RUNS}


def select_runs(text: str) -> list[Run]:
    """`all`, or comma-separated run names (in the order of RUNS)."""
    if text.strip() == "all":
        return list(RUNS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS_BY_NAME]
    if unknown or not names:
        raise CdspError(f"--runs: unknown bench run {', '.join(unknown) or repr(text)} "
                        f"(choose from {', '.join(RUNS_BY_NAME)}, or all)")
    return [r for r in RUNS if r.name in names]


def run_config(run: Run, cfg: SegTrainConfig, seed: int) -> SegTrainConfig:
    """The segmenter settings of one bench run: its terms keep their configured weights, the rest are 0."""
    configured = train.loss_weights(cfg)
    for t in run.terms:
        if configured[t] <= 0:
            raise CdspError(f"bench run {run.name} needs L_{t}, but {config.flag(train.LOSS_WEIGHTS[t])} is "
                            f"{configured[t]}; give it a weight > 0")
    weights = {train.LOSS_WEIGHTS[t]: (w if t in run.terms else 0.0) for t, w in configured.items()}
    return replace(cfg, **weights, **dict(run.settings), seg_target=run.target, seed=seed)


def scribbles_label(run: Run) -> str:
    if run.target == "gt":
        return "ground truth"
    if run.scribbles == CLEAN:
        return CLEAN
    mode, ratio = VARIANTS[run.scribbles]
    return f"{mode}({ratio:g})"


# ---------------------------------------------------------------------------- reuse of finished steps


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _reuse(path: Path, settings: dict) -> dict | None:
    """The recorded outcome of a finished step, if it was made with exactly these settings."""
    done = _load_json(path)
    return done["outcome"] if isinstance(done, dict) and done.get("settings") == settings else None


def _record(path: Path, settings: dict, outcome: dict) -> None:
    atomic_write_text(path, json.dumps({"settings": settings, "outcome": outcome}, indent=2) + "\n")


def _fresh(folder: Path) -> None:
    """Clear a step folder of this bench (its settings changed, or it was interrupted)."""
    if folder.exists():
        shutil.rmtree(folder)


def open_bench_dir(out: Path, settings: dict) -> str:
    """Create or reopen the bench folder; returns the bench id (kept across reruns).

    The bench folder is a workspace that a rerun resumes, so it is not swapped whole: the output
    policy (outputs.py) checks it, and each piece in it (views, stage 1, runs) is its own output."""
    outputs.check_target(out, "bench", inputs=[settings["data"]])
    marker = _load_json(out / MARKER)
    bench_id = (marker or {}).get("bench_id") or f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_marker(out, "bench")
    atomic_write_text(out / MARKER, json.dumps({"bench_id": bench_id, "settings": settings}, indent=2) + "\n")
    return bench_id


# ---------------------------------------------------------------------------- scribbles and stage 1


def training_view(index: data.DatasetIndex, out: Path, variant: str, seed: int, curve_val_images: int = 0) -> Path:
    """A dataset root for training: `index.root` through symlinks, with the train split and the first
    `curve_val_images` val images listed (the segmenter's per-epoch val_miou: a curve in MLflow for a
    few percent of an epoch, where the whole val split costs a fifth of a CPU epoch; the bench
    evaluates on all of it once at the end) and, for a variant, degraded scribbles (scribbles.degrade_dir).
    """
    view = out / "data" / variant
    scribble_dir, split_dir = index.scribble_dir, "bench_splits"
    settings = {"data": str(index.root.resolve()), "scribble_dir": index.scribble_dir,
                "split_dir": index.split_dir, "variant": variant, "seed": seed, "curve_val_images": curve_val_images}
    if _reuse(view / "view.json", settings) is not None:
        return view
    with outputs.output_dir(view, "dataset-view", inputs=[index.root]) as tmp:
        made = {data.MANIFEST, outputs.MARKER, split_dir}  # the view is an output of its own kind
        if variant != CLEAN:
            mode, ratio = VARIANTS[variant]
            scribble_dir = f"scribbles_{variant}"
            made.add(scribble_dir)
            scribbles.degrade_dir(index.root / index.scribble_dir, tmp / scribble_dir, mode, ratio, seed)
        for entry in index.root.iterdir():
            if entry.name not in made:
                (tmp / entry.name).symlink_to(entry.resolve())
        (tmp / split_dir).mkdir()
        shutil.copyfile(index.root / index.split_dir / "train.txt", tmp / split_dir / "train.txt")
        curve = [item.id for item in index.val if item.gt is not None][:curve_val_images]
        if curve:
            atomic_write_text(tmp / split_dir / "val.txt", "".join(f"{i}\n" for i in curve))
        atomic_write_text(tmp / data.MANIFEST, json.dumps({"scribble_dir": scribble_dir, "split_dir": split_dir},
                                                          indent=2) + "\n")
        _record(tmp / "view.json", settings, {"scribble_dir": scribble_dir})
    return view


def make_stage1(data_dir: Path, out: Path, variant: str, cls_cfg: ClassifierConfig, pl_cfg: PseudoLabelConfig,
                *, seed: int, device: str, classifier_dir: Path | None) -> dict:
    """Classifier (unless `classifier_dir` is given: a shared one) and pseudo-labels of one scribble set."""
    folder = out / "stage1" / variant
    outcome: dict = {"variant": variant}
    if classifier_dir is None:
        classifier_dir = folder / "classifier"
        settings = {"data": str(data_dir), **config.to_dict(cls_cfg), "seed": seed}
        done = _reuse(folder / "classifier.json", settings)
        if done is None:
            _fresh(classifier_dir)
            log.info("stage 1 (%s): training the classifier", variant)
            started = time.perf_counter()
            summary = train.train_classifier(str(data_dir), str(classifier_dir), cls_cfg, device=device, seed=seed)
            done = {"classifier_seconds": time.perf_counter() - started, "classifier_loss": summary.get("final_loss")}
            _record(folder / "classifier.json", settings, done)
        outcome.update(done)
    outcome["classifier"] = str(classifier_dir)

    pseudo_dir = folder / "pseudo"
    settings = {"data": str(data_dir), "classifier": str(classifier_dir), **config.to_dict(pl_cfg),
                "classifier_settings": _load_json(classifier_dir.parent / "classifier.json")}
    done = _reuse(folder / "pseudo.json", settings)
    if done is None:
        log.info("stage 1 (%s): pseudo-labels and distance maps", variant)
        summary = pseudolabel.pseudo_label(str(data_dir), str(pseudo_dir), pl_cfg, classifier_dir=str(classifier_dir),
                                           device=device)
        done = {"pseudo_seconds": summary["seconds"], "labelled_fraction": summary["labelled_fraction"],
                "pseudo_miou": summary.get("pseudo_miou"), "pseudo_per_class_iou": summary.get("pseudo_per_class_iou")}
        _record(folder / "pseudo.json", settings, done)
    outcome.update(done, pseudo=str(pseudo_dir))
    return outcome


# ---------------------------------------------------------------------------- one (run, seed)


def train_and_evaluate(run: Run, seed: int, train_dir: Path, data_dir: Path, stage1: dict | None, folder: Path,
                       seg_cfg: SegTrainConfig, eval_cfg: EvalConfig, resume: bool,
                       on_metrics: Callable[[dict, int], None] | None) -> dict:
    """Train the segmenter of one bench run with one seed on `train_dir` (with `stage1`'s pseudo-labels)
    and evaluate it on the val split of `data_dir`."""
    pseudo_dir = stage1["pseudo"] if stage1 else None
    cfg = run_config(run, seg_cfg, seed)
    started = time.perf_counter()
    summary = train.train_segmenter(str(train_dir), pseudo_dir, str(folder / "model"), cfg, resume=resume,
                                    on_metrics=on_metrics)
    train_seconds = time.perf_counter() - started
    metrics = evaluate.evaluate(str(data_dir), str(folder / "model"), str(folder / "eval"), eval_cfg,
                                device=cfg.device)
    return {"seed": seed, "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
            "per_class_iou": metrics["per_class_iou"], "seconds": time.perf_counter() - started,
            "train_seconds": train_seconds, "train_images_per_sec": summary.get("images_per_sec"),
            "pseudo_miou": stage1.get("pseudo_miou") if stage1 else None}


def run_label(run: Run, seed: int) -> str:
    """What MLflow's runs table, compare view and charts call a (run, seed): `cdsp · s0`."""
    return f"{run.name} · s{seed}"


def mlflow_key(bench_id: str, run: Run, seed: int, settings: dict) -> str:
    """The tag that finds a (run, seed)'s MLflow run again: keyed by its settings too, so a resumed
    run finds its MLflow run again and a run redone with other settings gets a new one."""
    return f"{bench_id}.{run.name}.seed{seed}.{config.settings_digest(settings)[:8]}"


def tracked(bench_id: str, experiment: str, run: Run, seed: int, params: dict, settings: dict,
            work: Callable) -> dict:
    """`work(on_metrics)` as one MLflow run of the bench experiment: params, curves, final metrics."""
    run_id = tracking.start_pipeline_run(mlflow_key(bench_id, run, seed, settings), experiment=experiment,
                                         params=params, run_name=run_label(run, seed), bench=bench_id,
                                         bench_run=run.name, seed=seed, scribbles=scribbles_label(run))
    with tracking.stage_run(run_id, "train_segmenter", params, curves_on_parent=True):
        outcome = work(tracking.log_metrics)
        final = tracking.headline({k: v for k, v in outcome.items() if v is not None})
        tracking.log_final_metrics({**final, "seconds": outcome["seconds"]}, run_id=run_id)
    return outcome


def experiment_note(bench_id: str, settings: dict, n_runs: int, seeds: int) -> str:
    """The bench experiment's description: what its runs are, what the numbers mean, the latest bench."""
    return (
        "`cdsp bench`: the ablation of CDSP (which loss terms, which scribbles) on one segmenter, budget and "
        "seeds.\n\n"
        "- One run per bench row and seed, named `<row> · s<seed>` (`cdsp · s0`, `scribble-only-drop0.5 · s1`): "
        "its settings as params (`bench_run`, `scribbles`, the loss weights `l_*`, ...), its val-split results "
        "`miou`, `pixel_acc`, `iou_<class>` and `pseudo_miou` (stage-1 pseudo-labels against ground truth), "
        "all **fractions in [0, 1]** (0.62 = 62 %), and its training curves, step = epoch (`loss`, each "
        "`loss_<term>`, `lr`, `images_per_sec`, and `val_miou` on the first val images: `curve_val_images`). "
        "The nested `<row> · s<seed> / train_segmenter` is the training itself.\n"
        "- `summary · <bench id>`: results.md (the table with the targets) and each row's mean mIoU over seeds "
        "(`miou_<row>`).\n"
        "- Compare rows: select runs, then Compare (differing params are highlighted), or the Chart view; "
        "`cdsp bench` prints the compare page of its runs at its end. One bench's runs: "
        "`tags.cdsp.bench = '<bench id>'`.\n\n"
        f"Latest bench: `{bench_id}`: {n_runs} rows × {seeds} seed(s), preset `{settings.get('preset')}`, "
        f"{settings.get('epochs')} epochs, on `{settings.get('data')}`.")


def start_summary(bench_id: str, experiment: str, settings: dict) -> str:
    """The bench's own MLflow run (made first, so that an unreachable server stops the bench at once);
    one per bench folder and settings."""
    return tracking.start_pipeline_run(f"{bench_id}.{config.settings_digest(settings)[:8]}", experiment=experiment,
                                       params=settings, run_name=f"summary · {bench_id}", bench=bench_id,
                                       bench_run="summary")


def compare_runs(experiment: str, bench_id: str, keys: list[str]) -> dict:
    """MLflow's compare page for this bench's (run, seed) runs, in the order of `keys` (`mlflow_key`'s;
    runs of this bench made with other settings are left out): {"experiment_id", "run_ids",
    "compare_url", "runs_url" (the runs table in a saved view: results as columns, best first), "note"}."""
    client = tracking.mlflow_client()
    with tracking.recording(f"(reading) the runs of bench {bench_id}"):
        exp = client.get_experiment_by_name(experiment)
        # this bench's (run, seed) runs, not its summary run nor the nested stage runs
        rows = (f"tags.`cdsp.bench` = '{bench_id}' and tags.`cdsp.bench_run` != 'summary' and "
                f"tags.`{tracking.TAG_STAGE}` = '{tracking.PIPELINE_STAGE}'")
        found = client.search_runs([exp.experiment_id], rows, max_results=5000)
    by_key = {r.data.tags.get(tracking.TAG_PIPELINE_RUN): r.info.run_id for r in found}
    run_ids = [by_key[k] for k in keys if k in by_key]
    url, note = tracking.compare_url(run_ids, [exp.experiment_id])
    # The UI orders metric columns by name: per-class IoUs would push mIoU off the page (they are on
    # the compare page and each run's).
    view = tracking.share_view(exp.experiment_id, bench_id,
                               ["metrics.miou", "metrics.pixel_acc", "metrics.pseudo_miou", "params.bench_run",
                                "params.scribbles", "params.seed"], order_by="metrics.miou",
                               search=rows)
    return {"experiment_id": exp.experiment_id, "run_ids": run_ids, "compare_url": url, "runs_url": view, "note": note}


def log_summary(run_id: str, results: dict, out: Path) -> None:
    """results.json/results.md and the mean mIoU of every bench run on the bench's own MLflow run."""
    with tracking.stage_run(run_id, "results"):
        metrics = {f"miou_{r['name']}": r["miou"]["mean"] for r in results["runs"]}
        metrics.update({f"pseudo_miou_{v}": s["pseudo_miou"] for v, s in results["stage1"].items()
                        if s.get("pseudo_miou") is not None})
        tracking.log_final_metrics(metrics, run_id=run_id)
        tracking.log_artifacts(out / "results.json", out / "results.md", run_id=run_id)


def run_job(job: dict) -> dict:
    """Train and evaluate one (run, seed) of the bench (in this process or a pool worker)."""
    work = functools.partial(train_and_evaluate, job["run"], job["seed"], job["train_dir"], job["data_dir"],
                             job["stage1"], job["folder"], job["seg_cfg"], job["eval_cfg"], job["resume"])
    bench_cfg = job["bench_cfg"]
    log.info("run %s: training", job["label"])
    if bench_cfg.mlflow:
        return tracked(job["bench_id"], bench_cfg.bench_experiment, job["run"], job["seed"], job["params"],
                       job["run_settings"], work)
    return work(None)


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logs.configure(level, "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")


# ---------------------------------------------------------------------------- aggregation and report


def aggregate(run: Run, seg_cfg: SegTrainConfig, per_seed: list[dict], stage1: dict | None) -> dict:
    """One row of results.json: mIoU mean/std/min/max over seeds (fractions), per-class means."""
    mious = [r["miou"] for r in per_seed]
    mean = sum(mious) / len(mious)
    std = math.sqrt(sum((m - mean) ** 2 for m in mious) / (len(mious) - 1)) if len(mious) > 1 else 0.0
    classes = [c for c in per_seed[0]["per_class_iou"] if all(c in r["per_class_iou"] for r in per_seed)]
    return {
        "name": run.name,
        "losses": {t: w for t, w in train.loss_weights(seg_cfg).items() if t in run.terms},
        "scribbles": scribbles_label(run),
        "target": run.target,
        "miou": {"mean": mean, "std": std, "min": min(mious), "max": max(mious), "per_seed": mious},
        "per_class_iou": {c: sum(r["per_class_iou"][c] for r in per_seed) / len(per_seed) for c in classes},
        "seconds": sum(r["seconds"] for r in per_seed) / len(per_seed),
        "seeds": [r["seed"] for r in per_seed],
        "pseudo_miou": stage1.get("pseudo_miou") if stage1 else None,
    }


# The targets the bench checks: those of the synthetic data, and for the `cpu-pretrained` preset those of
# real photos (docs/benchmarks.md, "Real photos"), where Google's fully supervised DeepLabv3-MobileNetV2
# scores REAL_CEILING on voc-real's val split.
REAL_PRESET = "cpu-pretrained"
REAL_CEILING = 0.834


def checks(rows: dict[str, dict], preset: str | None = None) -> list[dict]:
    """The issue's targets, where the runs they compare are present. `unit` says how `value` reads:
    points (mIoU difference), share (of full supervision) or miou."""

    def miou(name: str) -> float | None:
        return rows[name]["miou"]["mean"] if name in rows else None

    real = preset == REAL_PRESET
    share = 0.90 if real else 0.95
    out = []
    cdsp, scribble, full = miou("cdsp"), miou("scribble-only"), miou("full-supervision")
    if real and full is not None:
        out.append({"target": f"full-supervision >= 0.72 mIoU (86% of the fully supervised ceiling {REAL_CEILING})",
                    "value": full, "met": full >= 0.72, "unit": "miou"})
    if cdsp is not None and scribble is not None:
        out.append({"target": "cdsp >= scribble-only + 0.03 mIoU", "value": cdsp - scribble,
                    "met": cdsp - scribble >= 0.03, "unit": "points"})
    if cdsp is not None and full:
        out.append({"target": f"cdsp >= {share:.0%} of full-supervision", "value": cdsp / full,
                    "met": cdsp / full >= share, "unit": "share"})
    if real and cdsp is not None:
        out.append({"target": "moonshot: cdsp >= 0.75 mIoU (90% of the ceiling)", "value": cdsp, "met": cdsp >= 0.75,
                    "unit": "miou"})
    for variant in VARIANTS:
        c, s = miou(f"cdsp-{variant}"), miou(f"scribble-only-{variant}")
        if None not in (c, s, cdsp, scribble):
            out.append({"target": f"cdsp loses less than scribble-only on {variant}",
                        "value": (cdsp - c) - (scribble - s), "met": cdsp - c < scribble - s, "unit": "points"})
    return out


def term_label(term: str) -> str:
    """A loss term's column in results.md: L_<term>, LoRM for the rectification loss (the paper's name)."""
    return "LoRM" if term == "lorm" else f"L_{term}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render_markdown(results: dict) -> str:
    rows = results["runs"]
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("scribble-only", {}).get("miou", {}).get("mean")
    seeds = max((len(r["seeds"]) for r in rows), default=0)
    st = results["settings"]
    lines = [f"# CDSP bench: {results['data']}", "",
             f"Preset `{results['preset']}`, segmenter {st['segmenter']} / {st['backbone']}"
             f"{f' (width {w})' if (w := st.get('width', 64)) != 64 else ''}, output stride "
             f"{st.get('output_stride', 8)}{' (no max-pool in the stem)' if st.get('stem_stride', 4) == 2 else ''}, "
             f"{st.get('optimizer', 'sgd')} lr {st['lr']:g}, {st['epochs']} epochs, "
             f"{seeds} seed(s) per run. "
             "mIoU in % on the val split: mean ± standard deviation over seeds (min–max).", "",
             f"| run | scribbles | {' | '.join(term_label(t) for t in train.LOSS_TERMS)} | mIoU | Δ scribble-only "
             "| min–max | s/seed |",
             "| --- | --- |" + " :---: |" * len(train.LOSS_TERMS) + " ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["miou"]
        ticks = " | ".join("✓" if t in r["losses"] else "" for t in train.LOSS_TERMS)
        delta = "" if base is None or r["name"] == "scribble-only" else f"{100 * (m['mean'] - base):+.1f}"
        what = r["scribbles"] if r["target"] != "gt" else "ground truth"
        lines.append(f"| {r['name']} | {what} | {ticks} | {_pct(m['mean'])} ± {_pct(m['std'])} | {delta} | "
                     f"{_pct(m['min'])}–{_pct(m['max'])} | {r['seconds']:.0f} |")

    lines += ["", "## Robustness to worse scribbles", "",
              "| scribbles | scribble-only | cdsp | cdsp − scribble-only |", "| --- | ---: | ---: | ---: |"]
    for variant, label in ((CLEAN, CLEAN), *((v, f"{m}({r:g})") for v, (m, r) in VARIANTS.items())):
        suffix = "" if variant == CLEAN else f"-{variant}"
        s, c = by_name.get(f"scribble-only{suffix}"), by_name.get(f"cdsp{suffix}")
        if s or c:
            sm, cm = (x["miou"]["mean"] if x else None for x in (s, c))
            diff = f"{100 * (cm - sm):+.1f}" if s and c else "–"
            lines.append(f"| {label} | {_pct(sm)} | {_pct(cm)} | {diff} |")

    if results["stage1"]:
        lines += ["", "## Stage 1: pseudo-label quality (training images against ground truth)", "",
                  "| scribbles | pseudo-label mIoU | labelled pixels | classifier s | pseudo-label s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for variant, s in results["stage1"].items():
            cls_s = f"{s['classifier_seconds']:.0f}" if "classifier_seconds" in s else "shared"
            lines.append(f"| {variant} | {_pct(s.get('pseudo_miou'))} | {100 * s['labelled_fraction']:.0f}% | "
                         f"{cls_s} | {s['pseudo_seconds']:.0f} |")
        width = f", width {st['cls_width']}" if st.get("cls_width", 64) != 64 else ""
        lines += ["", f"Classifier {st['cls_backbone']} (stride {st['cls_output_stride']}{width}, "
                      f"{st['cls_epochs']} epochs, "
                      f"scribble CE {st['cls_scribble_ce']:g}); CAM τ {st['cam_threshold']:g}, margin "
                      f"{st['cam_margin']:g}, random walk {'on' if st['cam_random_walk'] else 'off'}."]

    if results["checks"]:
        lines += ["", "## Targets", "", "| target | measured | met |", "| --- | ---: | :---: |"]
        for c in results["checks"]:
            value = {"share": f"{100 * c['value']:.1f}%", "miou": f"{100 * c['value']:.1f}"}.get(
                c.get("unit"), f"{100 * c['value']:+.1f} points")
            lines.append(f"| {c['target']} | {value} | {'yes' if c['met'] else 'no'} |")

    lines += ["", "## Per-class IoU (%, mean over seeds)", "",
              report.iou_table({r["name"]: r["per_class_iou"] for r in rows}, percent=True)]
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", render_markdown(results))


# ---------------------------------------------------------------------------- the bench


def bench(data_dir: str, out_dir: str, cls_cfg: ClassifierConfig, pl_cfg: PseudoLabelConfig,
          seg_cfg: SegTrainConfig, eval_cfg: EvalConfig, bench_cfg: BenchConfig, *, preset: str | None = None) -> dict:
    """Run the bench (see the module docstring); writes results.json/results.md and returns the results."""
    if "://" in data_dir:
        raise CdspError(f"{data_dir}: the bench needs a local dataset folder (copy it with cdsp prepare --copy)")
    if bench_cfg.seeds < 1:
        raise CdspError(f"--seeds {bench_cfg.seeds}: need at least one seed")
    runs = select_runs(bench_cfg.runs)
    index = data.load_index(data_dir)
    if not any(it.gt is not None for it in index.val):
        raise CdspError(f"{data_dir}: no val images with ground truth; the bench has nothing to evaluate on")
    no_gt = [it for it in index.train if it.gt is None]
    if no_gt and any(r.target == "gt" for r in runs):
        if bench_cfg.runs.strip() != "all":
            raise CdspError(f"{no_gt[0].image}: training image without ground truth, which full-supervision needs "
                            f"({len(no_gt)} such); leave that run out of --runs")
        log.warning("%d training images have no ground truth: full-supervision is left out", len(no_gt))
        runs = [r for r in runs if r.target != "gt"]
    for run in runs:
        run_config(run, seg_cfg, seg_cfg.seed)  # every needed weight > 0, before hours of work

    out = Path(out_dir).resolve()  # recorded paths stay valid from any working folder
    root = index.root.resolve()
    settings = {**config.to_dict(cls_cfg, pl_cfg, seg_cfg, eval_cfg, bench_cfg), "data": str(root),
                "preset": preset or "paper"}
    bench_id = open_bench_dir(out, settings)
    summary_run = None
    if bench_cfg.mlflow:
        summary_run = start_summary(bench_id, bench_cfg.bench_experiment, settings)
        tracking.describe_experiment(bench_cfg.bench_experiment,
                                     experiment_note(bench_id, settings, len(runs), bench_cfg.seeds))
    log.info("bench %s: %d runs x %d seeds on %s -> %s", bench_id, len(runs), bench_cfg.seeds, root, out)

    # Stage 1, once per scribble set that a run with pseudo-labels (or distance maps) uses.
    roots = {variant: training_view(index, out, variant, bench_cfg.degrade_seed, bench_cfg.curve_val_images)
             for variant in dict.fromkeys(r.scribbles for r in runs)}
    stage1: dict[str, dict] = {}
    shared_classifier = None
    for variant in dict.fromkeys(r.scribbles for r in runs if train.needed_maps(run_config(r, seg_cfg, 0))):
        # Without the scribble CE, the classifier sees only image-level labels, which drop/shrink keep.
        stage1[variant] = make_stage1(roots[variant], out, variant, cls_cfg, pl_cfg, seed=seg_cfg.seed,
                                      device=seg_cfg.device, classifier_dir=shared_classifier)
        if cls_cfg.cls_scribble_ce == 0:
            shared_classifier = Path(stage1[variant]["classifier"])

    results = {"bench_id": bench_id, "data": str(root), "preset": preset or "paper", "settings": settings,
               "stage1": stage1, "runs": [], "checks": []}
    todo, done = [], {}  # (run, seed) pairs to train; finished outcomes by (run name, seed)
    keys = []  # the MLflow keys of this bench's (run, seed) runs
    for i, run in enumerate(runs, 1):
        stage = stage1.get(run.scribbles) if train.needed_maps(run_config(run, seg_cfg, 0)) else None
        for seed in range(seg_cfg.seed, seg_cfg.seed + bench_cfg.seeds):
            folder = out / "runs" / run.name / f"seed{seed}"
            cfg = run_config(run, seg_cfg, seed)
            params = {**config.to_dict(cfg, eval_cfg), "bench_run": run.name, "scribbles": scribbles_label(run)}
            run_settings = {**params, "data": str(roots[run.scribbles]),
                            "pseudo": stage and {k: stage[k] for k in ("pseudo", "pseudo_miou", "classifier")}}
            keys.append(mlflow_key(bench_id, run, seed, run_settings))
            outcome = _reuse(folder / RESULT, run_settings)
            if outcome is not None:
                done[run.name, seed] = outcome
                continue
            # An interrupted run with the same settings continues from its checkpoint.
            resume = _reuse(folder / STARTED, run_settings) is not None
            if not resume:
                _fresh(folder)
                _record(folder / STARTED, run_settings, {})
            todo.append(dict(label=f"{i}/{len(runs)} {run.name}, seed {seed}", run=run, seed=seed,
                             train_dir=roots[run.scribbles], data_dir=root, stage1=stage, folder=folder,
                             seg_cfg=seg_cfg, eval_cfg=eval_cfg, resume=resume, params=params,
                             run_settings=run_settings, bench_id=bench_id, bench_cfg=bench_cfg))

    def report() -> None:
        """results.json/md from the runs whose seeds are all done, in the order of RUNS."""
        results["runs"] = [aggregate(r, seg_cfg, per_seed, stage1.get(r.scribbles)
                                     if train.needed_maps(run_config(r, seg_cfg, 0)) else None)
                           for r in runs
                           if len(per_seed := [done[k] for k in sorted(done) if k[0] == r.name]) == bench_cfg.seeds]
        results["checks"] = checks({r["name"]: r for r in results["runs"]}, preset)
        write_results(out, results)

    def finished(job: dict, outcome: dict) -> None:
        _record(job["folder"] / RESULT, job["run_settings"], outcome)
        log.info("run %s: mIoU %.4f (%.0f s)", job["label"], outcome["miou"], outcome["seconds"])
        done[job["run"].name, job["seed"]] = outcome
        report()  # after every run, so a long bench shows its progress

    for (name, seed), outcome in done.items():
        log.info("run %s, seed %d: done before, mIoU %.4f", name, seed, outcome["miou"])
    jobs = max(1, min(bench_cfg.jobs, len(todo)))
    if jobs == 1:
        for job in todo:
            finished(job, run_job(job))
    else:
        # One process per job, each with its share of the cores: two single-threaded trainings on two
        # cores run about twice as fast as one with two threads. spawn, not fork: this process has
        # used OpenMP (stage 1), which does not survive a fork.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        log.info("%d runs to train, %d at a time, %d thread(s) each", len(todo), jobs, threads)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads, logging.getLogger().level)) as pool:
            futures = {pool.submit(run_job, job): job for job in todo}
            try:
                for future in as_completed(futures):
                    finished(futures[future], future.result())
            except BaseException:
                for future in futures:  # a failed run stops the bench; the running one finishes its epoch
                    future.cancel()
                raise
    if summary_run:
        results["mlflow"] = compare_runs(bench_cfg.bench_experiment, bench_id, keys)
    report()
    if summary_run:
        log_summary(summary_run, results, out)
    return results


# ---------------------------------------------------------------------------- CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="the ablation and scribble-robustness benchmark: every run side by side",
        description="Trains and evaluates the ablation runs (scribble-only ... cdsp, full-supervision) and cdsp / "
                    "scribble-only on drop(0.5) and shrink(0.5) scribbles, with a shared stage 1; writes "
                    "results.json and results.md to --out and logs every run to MLflow. A rerun resumes.")
    p.add_argument("--data", required=True, help="dataset root (VOC layout) with ground truth for val "
                                                 "(and for train: pseudo-label quality, full-supervision)")
    p.add_argument("--out", required=True, help="bench folder (created; an earlier bench folder is resumed)")
    config.add_arguments(p, ClassifierConfig, PseudoLabelConfig, SegTrainConfig, EvalConfig, BenchConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfgs = [config.from_namespace(cls, args) for cls in
            (ClassifierConfig, PseudoLabelConfig, SegTrainConfig, EvalConfig, BenchConfig)]
    results = bench(args.data, args.out, *cfgs, preset=args.preset)
    for r in results["runs"]:
        m = r["miou"]
        print(f"{r['name']:<26} mIoU {m['mean']:.4f} ± {m['std']:.4f}  ({r['scribbles']})")
    print(f"results -> {os.path.join(args.out, 'results.md')}")
    if "mlflow" in results:
        mlflow = results["mlflow"]
        print(f"compare in MLflow ({len(mlflow['run_ids'])} runs): {mlflow['compare_url']}")
        print(f"runs table with the results as columns, best first: {mlflow['runs_url']}")
        if mlflow["note"]:
            print(f"  ({mlflow['note']})")
    return 0
