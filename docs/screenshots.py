"""`make screenshots`: the MLflow dashboard as a user sees it, as PNGs under docs/images/.

    .venv/bin/python docs/screenshots.py [--out docs/images] [--work build/screenshots]

Fills a throwaway MLflow store (`fill_store`) with a small `cdsp bench` (scribble-only and cdsp,
one seed) and a small demo (the whole pipeline through kfp's local runner) on synthetic data,
serves the UI on 127.0.0.1 (`mlflow server`, as `make mlflow-ui` does) and photographs it with
Debian's Chromium, headless: the bench's runs table in the view the bench prints (its results as
columns), the compare view of the two bench runs, the demo's evaluation overlays in the artifact
view, and the registered model. tests/test_dashboard.py reads a store filled by `fill_store`
through the MLflow client.

Chromium opens the UI by a name other than localhost (mapped to 127.0.0.1), as one opens a shared
MLflow server: on localhost, MLflow's UI opens its assistant panel over a third of the page.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' MLflow server (tests/services.py)

from PIL import Image  # noqa: E402
from services import mlflow_server  # noqa: E402

from cdsp_core import registry, tracking  # noqa: E402

UI_HOST = "mlflow.test"  # resolved to 127.0.0.1 by Chromium's --host-resolver-rules
BENCH_ROWS = "scribble-only,cdsp"
SIZE = (1280, 860)
TALL = (1280, 2350)  # the compare page: its params and metrics tables come below a plot


def run(argv: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({done.returncode}); its log: {log}")


def fill_store(tracking_uri: str, work: Path, *, n_train: int = 100, n_val: int = 20, size: int = 64,
               epochs: int = 8) -> dict:
    """A small bench and a small demo into the MLflow server at `tracking_uri`; what they made."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "2"}
    py = sys.executable
    data = work / "data"
    if not (data / "synth.json").is_file():
        run([py, "-m", "cdsp_core", "synth", "--out", str(data), "--n-train", str(n_train), "--n-val", str(n_val),
             "--size", str(size)], env, work / "synth.log")
    run([py, "-m", "cdsp_core", "bench", "--data", str(data), "--out", str(work / "bench"), "--preset", "cpu",
         "--runs", BENCH_ROWS, "--seeds", "1", "--epochs", str(epochs), "--cls-epochs", "2", "--jobs", "1"],
        env, work / "bench.log")
    run([py, "-m", "pipelines.local_run", "--out", str(work / "demo"), "--synth-train", str(n_train),
         "--synth-val", str(n_val), "--synth-size", str(size), "--epochs", str(epochs), "--cls-epochs", "2"],
        env, work / "demo.log")

    client = tracking.mlflow_client()
    pipeline_exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    evaluate = client.search_runs([pipeline_exp.experiment_id], f"tags.`{tracking.TAG_STAGE}` = 'evaluate'")[0]
    version = client.search_model_versions(f"name='{registry.MODEL_NAME}'")[0]
    return {"bench": json.loads((work / "bench" / "results.json").read_text())["mlflow"],
            "bench_output": (work / "bench.log").read_text(errors="replace"),
            "pipeline_experiment": pipeline_exp.experiment_id, "evaluate_run": evaluate.info.run_id,
            "model_version": version.version}


def shoot(url: str, path: Path, profile: Path, size: tuple[int, int]) -> None:
    """One screenshot of `url` (its JavaScript given 20 s of virtual time to render)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install chromium (Debian)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1",
                    f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=20000",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=120)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # a third of the bytes
    print(f"{path} <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"), help="folder of the PNGs")
    parser.add_argument("--work", default=None, help="folder of the throwaway store and runs (default: a temp folder)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdsp-shots-") as tmp:
        work = Path(args.work or tmp)
        with mlflow_server(work / "mlflow", ui_host=UI_HOST) as server:
            os.environ["MLFLOW_TRACKING_URI"] = server.url
            made = fill_store(server.url, work)
            ui = f"http://{UI_HOST}:{server.port}"
            pages = {  # the links the bench printed, and two more pages
                "mlflow-runs.png": made["bench"]["runs_url"].replace(server.url, ui),
                "mlflow-compare.png": made["bench"]["compare_url"].replace(server.url, ui),
                "mlflow-artifacts.png": f"{ui}/#/experiments/{made['pipeline_experiment']}/runs/"
                                        f"{made['evaluate_run']}/artifacts/overlays/val_00000.png",
                "mlflow-registry.png": f"{ui}/#/models/{registry.MODEL_NAME}/versions/{made['model_version']}",
            }
            profile = work / "chromium"
            for name, url in pages.items():
                shoot(url, out / name, profile, TALL if name == "mlflow-compare.png" else SIZE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
