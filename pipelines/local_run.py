"""Run the whole CDSP pipeline on this machine with kfp's local runner.

The very DAG that `make pipeline` compiles runs here, step by step, as subprocesses in the
project's own Python environment (`kfp.local.SubprocessRunner(use_venv=False)`), with the
`cpu` preset by default. Without --data-uri it generates the synthetic dataset first (once).
MLflow goes to the project's SQLite database (`make mlflow-ui`) unless MLFLOW_TRACKING_URI is
set; PUSHGATEWAY_URL, AWS_* and other environment variables reach every step.

    python -m pipelines.local_run --out build/demo                 # synthetic data
    python -m pipelines.local_run --data-uri s3://bucket/voc --epochs 5

What differs from a cluster run: kfp's local runner ignores the Kubernetes settings (secrets,
GPUs, /dev/shm, resources), caching is off, and steps are not retried unless CDSP_RETRIES is
set (a failure here is usually not a passing one, and kfp would wait 30 s, then 60 s, to retry).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from cdsp_core import config, tracking
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError

log = logging.getLogger("cdsp.local_run")

SETTINGS_CLASSES = (config.PipelineConfig, *config.ALL_CONFIGS)
DEFAULT_PRESET = "cpu"
# Segmenter epochs of the demo on synthetic data (an explicit --epochs wins): fewer than the
# preset's 40, so that `make demo` ends in under 3 minutes with a model well above 0.6 val mIoU
# (25 epochs: 0.73 in 167 s; docs/benchmarks.md, "make demo").
DEMO_EPOCHS = 25


def pipeline_arguments(preset: str | None, overrides: dict) -> dict:
    """Every pipeline parameter: defaults, then the preset, then explicit overrides (None = unset)."""
    return config.to_dict(*(config.build(cls, preset, overrides) for cls in SETTINGS_CLASSES))


def ensure_synthetic_data(root: Path, n_train: int, n_val: int, size: int) -> Path:
    """The synthetic dataset in `root`: reused when it was made with these numbers, else (re)made."""
    from cdsp_core import synth

    wanted = {"n_train": n_train, "n_val": n_val, "size": size}
    marker = root / synth.MARKER
    made = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    if {k: made.get(k) for k in wanted} == wanted:
        log.info("using the synthetic dataset in %s", root)
    else:
        synth.make_dataset(root, **wanted)
    return root


@contextlib.contextmanager
def one_thread_when_busy():
    """While the steps run on a machine already busier than its cores: one intra-op thread each.

    OpenMP threads spin while they wait for a core, so there PyTorch runs several times faster
    with one thread than with two (docs/benchmarks.md). An explicit OMP_NUM_THREADS wins.
    """
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if "OMP_NUM_THREADS" in os.environ or load < cores:
        yield
        return
    log.info("load average %.1f on %d cores: one thread per step (set OMP_NUM_THREADS to choose)", load, cores)
    os.environ["OMP_NUM_THREADS"] = "1"  # the steps inherit it
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def task_outputs(run_dir: Path, task: str) -> dict:
    """Output parameters of one finished task, from its executor_output.json (empty if it did not run)."""
    path = run_dir / task / "executor_output.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("parameterValues", {})


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


class StepErrors(io.TextIOBase):
    """Stdout that passes everything through and keeps the last CdspError a step printed."""

    PATTERN = re.compile(r"cdsp_core\.errors\.CdspError: (.+)")

    def __init__(self, out):
        self.out, self.last = out, ""

    def write(self, text: str) -> int:
        for match in self.PATTERN.finditer(text):
            self.last = match.group(1).strip()
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def run(arguments: dict, out_dir: str | os.PathLike) -> dict:
    """Run the pipeline locally with these pipeline arguments; return what happened.

    The result: `run_dir` (the run's folder of task outputs), `trained` (False when the data
    was unchanged since the champion), `decision` and, when trained, `metrics`
    (`metrics.json` of the evaluation), `report` (its markdown), `promoted` and `model_dir`.
    """
    from kfp import local

    from pipelines.cdsp_pipeline import PIPELINE_NAME, build_pipeline, cluster_settings

    root = Path(out_dir).resolve() / "runs"
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    cluster = cluster_settings()
    if not os.environ.get("CDSP_RETRIES"):
        cluster = dataclasses.replace(cluster, retries=0)
    if not cluster.checkpoint_root:  # the local runner keeps its runs in `root`, not under cluster.pipeline_root
        cluster = dataclasses.replace(cluster, checkpoint_root=str(root / "checkpoints"))
    if not cluster.data_store:  # likewise the data store, shared by the runs in `root`
        cluster = dataclasses.replace(cluster, data_store=str(root / "datastore"))
    pipeline = build_pipeline(cluster)
    steps = StepErrors(sys.stdout)
    with warnings.catch_warnings(), contextlib.redirect_stdout(steps), one_thread_when_busy():
        # Our image names carry no "python"; kfp warns for that, but here the steps run in our venv by design.
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        try:
            pipeline(**arguments)
        except RuntimeError as e:  # kfp names the failed task; the step's own error is in its log above
            failed = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("Inner task failed:")[-1].strip(" .'")
            raise CdspError(f"step {failed} failed: {steps.last or 'see its log above'}") from None
    new = sorted((p for p in set(root.iterdir()) - before if p.name.startswith(PIPELINE_NAME)), key=os.path.getmtime)
    if not new:
        raise CdspError(f"{root}: the local runner left no run folder")
    run_dir = new[-1]
    prep = task_outputs(run_dir, "data-prep")
    result = {"run_dir": str(run_dir), "trained": bool(prep.get("Output")),
              "fingerprint": read_text(run_dir / "data-prep" / "fingerprint"),
              "data_report": read_text(run_dir / "data-prep" / "data_report")}
    evaluation = run_dir / "evaluate" / "evaluation"
    if result["trained"]:
        result.update(metrics=json.loads(read_text(evaluation / "metrics.json")),
                      report=read_text(evaluation / "report.md"),
                      promoted=bool(task_outputs(run_dir, "evaluate").get("Output")),
                      model_dir=str(run_dir / "train-segmenter" / "model"), evaluation_dir=str(evaluation))
    return result


def summary_text(result: dict) -> str:
    lines = [""]
    if result["trained"]:
        m = result["metrics"]
        from cdsp_core.evaluate import promotion_veto

        veto = promotion_veto(m)
        verdict = "promoted to champion" if result["promoted"] else \
            f"not promoted: {veto or 'the champion is as good or better'}"
        lines += [result["report"].strip(), "", f"mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_acc']:.4f}; {verdict}"]
    else:
        lines += ["Training skipped: the champion model was trained on this very data "
                  f"(fingerprint {result['fingerprint'][:16]}). Use --force-train to train anyway."]
    lines += ["", "Where to look next:", f"  run folder (every step's outputs): {result['run_dir']}"]
    if result["trained"]:
        lines += [f"  model:                              {result['model_dir']}",
                  f"  evaluation (metrics, overlays):     {result['evaluation_dir']}",
                  f"  its report, for a browser:          {result['evaluation_dir']}/report.html"]
    address, note = tracking.ui_address()
    lines += [f"  MLflow UI:  {address} (experiment 'cdsp', model cdsp-segmenter)"]
    if note:
        lines += [f"              ({note})"]
    if os.environ.get("PUSHGATEWAY_URL"):
        lines += [f"  Prometheus: metrics pushed to {redact(os.environ['PUSHGATEWAY_URL'])} (cdsp_* series)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.local_run", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="build/demo", help="folder of the runs (and of the synthetic data)")
    # The demo's data: `cdsp synth`'s default set (the bench's). On 120/30 images an earlier preset's
    # 50 epochs ended at 0.40 mIoU: the segmenter needs the images more than the epochs
    # (docs/benchmarks.md, "make demo").
    parser.add_argument("--synth-train", type=int, default=400, help="synthetic training images (no --data-uri)")
    parser.add_argument("--synth-val", type=int, default=100, help="synthetic validation images (no --data-uri)")
    parser.add_argument("--synth-size", type=int, default=96, help="synthetic image side in pixels (no --data-uri)")
    config.add_arguments(parser, *SETTINGS_CLASSES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    try:
        if not args.data_uri:
            args.data_uri = str(ensure_synthetic_data(out / "data", args.synth_train, args.synth_val, args.synth_size))
            if args.epochs is None:
                args.epochs = DEMO_EPOCHS
        elif "://" not in args.data_uri:
            if not Path(args.data_uri).is_dir():
                raise CdspError(f"{args.data_uri}: no such dataset folder")
            args.data_uri = str(Path(args.data_uri).resolve())  # the steps may run elsewhere
        arguments = pipeline_arguments(args.preset or DEFAULT_PRESET, vars(args))
        started = time.time()
        result = run(arguments, out)
    except CdspError as e:
        print(f"local_run: error: {e}", file=sys.stderr)
        return 2
    print(summary_text(result))
    print(f"\nThe local pipeline run took {time.time() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
