"""`make submit`: run arguments typed by the compiled pipeline, one line when the KFP API is away.

The real kfp client talks to a small stand-in for the KFP API on 127.0.0.1 (the four requests
a submission makes), which records what it is sent.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cdsp_core.errors import CdspError
from pipelines import cdsp_pipeline, submit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    return cdsp_pipeline.compile_pipeline(str(tmp_path_factory.mktemp("submit") / "cdsp_pipeline.yaml"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_submit_to_an_unreachable_endpoint_is_one_line(package):
    port = closed_port()
    # -o: the venv and the compiled pipeline (the fixture's) are there already
    proc = subprocess.run(["make", "-s", "-o", "install", "-o", "pipeline", "submit", f"VENV={sys.prefix}",
                           f"PIPELINE_YAML={package}", f"KFP_ENDPOINT=http://127.0.0.1:{port}",
                           "DATA_URI=s3://data/voc", "RUN_ARGS=gpus=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(ours) == 1, proc.stderr
    assert ours[0].startswith(f"submit: error: cannot reach the KFP API at http://127.0.0.1:{port} (")
    assert "Connection refused" in ours[0]


class FakeKfpApi(BaseHTTPRequestHandler):
    """Answers healthz, experiment lookup and creation, and run creation; records the POST bodies."""

    posted: list = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer({"multi_user": False} if self.path.startswith(submit.HEALTHZ) else {})  # no experiments yet

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posted.append((self.path, body))
        self._answer({"experiment_id": "exp-1", "display_name": body.get("display_name")}
                     if self.path.endswith("/experiments") else {"run_id": "run-1"})

    def log_message(self, *args):
        pass


def test_submit_sends_each_argument_in_its_parameter_type(package, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        rc = submit.main(["--endpoint", endpoint, package, "data_uri=s3://data/voc", "gpus=2", "cls_gpus=0",
                          "epochs=3", "lr=0.01", "force_train=true"])
    finally:
        server.shutdown()
    assert rc == 0, capsys.readouterr().err
    assert "submitted run run-1 (experiment cdsp)" in capsys.readouterr().out
    (experiment_path, experiment), (run_path, run) = FakeKfpApi.posted
    assert experiment_path.endswith("/experiments") and experiment["display_name"] == "cdsp"
    assert run_path.endswith("/runs") and run["experiment_id"] == "exp-1"
    # the GPU counts as strings (the form KFP's driver makes a limit of), the rest in their own types
    assert run["runtime_config"]["parameters"] == {"data_uri": "s3://data/voc", "gpus": "2", "cls_gpus": "0",
                                                   "epochs": 3, "lr": 0.01, "force_train": True}
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == cdsp_pipeline.PIPELINE_NAME


def test_bad_run_arguments_are_named(package):
    types = submit.parameter_types(package)
    assert types["gpus"] == "STRING" and types["epochs"] == "NUMBER_INTEGER"
    for pairs, message in [(["epochs=many"], "epochs='many': not a value of type NUMBER_INTEGER"),
                           (["epoch=3"], "epoch: not a parameter of this pipeline (parameters: "),
                           (["gpus"], "'gpus': give run arguments as name=value"),
                           (["force_train=maybe"], "force_train='maybe': not a value of type BOOLEAN")]:
        with pytest.raises(CdspError) as err:
            submit.typed_arguments(types, pairs)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(CdspError, match="give its URL, with http:// or https://"):
        submit.check_endpoint("kfp.example.com")


def test_run_arguments_out_of_their_range_are_refused_before_submitting(package, capsys):
    """What a step would refuse (batch_size 0, lr nan) is refused here, before the endpoint is even asked."""
    for pair, message in [("batch_size=0", "batch_size must be a whole number from 1 to 4096, got 0"),
                          ("lr=nan", "lr must be a number > 0 and <= 10, got nan")]:
        assert submit.main(["--endpoint", "http://127.0.0.1:9", package, "data_uri=s3://b/d", pair]) == 2
        err = capsys.readouterr().err
        assert err.startswith("submit: error: ") and message in err and "cannot reach" not in err, err
