"""`make screenshots`: the MLflow dashboard as a user sees it after `make bench-real` and `make demo-real`.

    .venv/bin/python docs/screenshots.py [--out docs/images] [--bench build/bench-real/results/results.json]

Serves the project's MLflow store (`mlflow.db` and `mlruns/`, as `make mlflow-ui` does) on
127.0.0.1 and photographs it with Debian's Chromium, headless: the real-photo bench's runs table in
the view the bench prints (its results as columns, best first), the compare page of its
`scribble-only` and `cdsp` runs of the first seed, the latest pipeline run's evaluation overlays
(real photos) in the artifact view, and the latest registered model version. Nothing is trained
here: the pictures show the runs those two commands left, as a user would find them.

Chromium opens the UI by a name other than localhost (mapped to 127.0.0.1), as one opens a shared
MLflow server: on localhost, MLflow's UI opens its assistant panel over a third of the page. Every
address asks for the UI's model-training mode (`report.mlflow_ui_url` adds it), not its GenAI one.
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

from cdsp_core import registry, report, tracking  # noqa: E402

UI_HOST = "mlflow.test"  # resolved to 127.0.0.1 by Chromium's --host-resolver-rules
SIZE = (1280, 860)
TALL = (1280, 2000)  # the compare page: its params and metrics tables come below a plot


def pages(bench_results: Path) -> dict[str, str]:
    """The routes to photograph (after the UI's `#/`), found in the store the client points at."""
    client = tracking.mlflow_client()
    bench = json.loads(bench_results.read_text())
    runs = client.search_runs([bench["mlflow"]["experiment_id"]], f"tags.`cdsp.bench` = '{bench['bench_id']}'")
    by_name = {r.info.run_name: r for r in runs}
    pair = [by_name[f"{row} · s0"] for row in ("scribble-only", "cdsp")]
    pipeline_exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    evaluate = client.search_runs([pipeline_exp.experiment_id], f"tags.`{tracking.TAG_STAGE}` = 'evaluate'",
                                  order_by=["attributes.start_time DESC"], max_results=1)[0]
    overlay = client.list_artifacts(evaluate.info.run_id, "overlays")[0].path  # named after the val image
    version = max(client.search_model_versions(f"name='{registry.MODEL_NAME}'"), key=lambda v: int(v.version))
    route = bench["mlflow"]["runs_url"].split("#/", 1)[1]
    return {
        "mlflow-runs.png": route,
        "mlflow-compare.png": tracking.compare_url([r.info.run_id for r in pair],
                                                   [pair[0].info.experiment_id])[0].split("#/", 1)[1],
        "mlflow-artifacts.png": f"experiments/{pipeline_exp.experiment_id}/runs/{evaluate.info.run_id}"
                                f"/artifacts/{overlay}",
        "mlflow-registry.png": f"models/{registry.MODEL_NAME}/versions/{version.version}",
    }


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
    parser.add_argument("--bench", default=str(REPO / "build" / "bench-real" / "results" / "results.json"),
                        help="results.json of the bench to show (make bench-real's)")
    parser.add_argument("--store", default=f"sqlite:///{REPO / 'mlflow.db'}", help="MLflow backend store")
    parser.add_argument("--artifacts", default=str(REPO / "mlruns"), help="its default artifact root")
    args = parser.parse_args()
    if not Path(args.bench).is_file():
        raise SystemExit(f"{args.bench}: no bench results; run `make bench-real` and `make demo-real` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdsp-shots-") as tmp, \
            mlflow_server(tmp, ui_host=UI_HOST, store=(args.store, args.artifacts)) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.url
        ui = f"http://{UI_HOST}:{server.port}"
        for name, route in pages(Path(args.bench)).items():
            url = report.mlflow_ui_url(ui, route)
            shoot(url, out / name, Path(tmp) / "chromium", TALL if name == "mlflow-compare.png" else SIZE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
