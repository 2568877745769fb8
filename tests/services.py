"""Real servers for the tests, each on a free port of 127.0.0.1.

The tests share one of each per session (tests/conftest.py: `s3_service`, `mlflow_service`,
`pushgateway_service`) and keep to their own buckets, experiments, model names and run labels;
a test that stops a server starts its own.

- `s3_server()`: moto's standalone S3-compatible server (`moto_server`);
- `mlflow_server(folder)`: `mlflow server` with a SQLite backend and an artifact folder;
- `pushgateway()`: Debian's `prometheus-pushgateway`, metrics kept in memory only;
- `TcpRelay(port)`: a TCP relay in front of any of them that a test can cut (the endpoint goes
  away: open connections are dropped, new ones refused) and restore, also after a given number
  of relayed bytes, i.e. in the middle of a transfer.

Each server runs in its own process group, so `stop()` ends it and its children, and
`restart()` brings it back on the same port with the same data folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def executable(name: str, hint: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed: {hint}")
    return str(path)


class Service:
    """A server subprocess on 127.0.0.1:`port`, ready when GET `ready_path` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, folder: Path,
                 env: dict[str, str] | None = None, start_timeout: float = 60.0):
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.folder, self.extra_env, self.start_timeout = folder, env or {}, start_timeout
        self.log_path = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        if os.environ.get("CDSP_TESTS_WITHOUT_SERVERS"):  # set by `make test-fast`
            raise RuntimeError(f"{self.name}: the fast tier starts no server; mark the test `slow` (tests/conftest.py)")
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open by the child)
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.extra_env}, cwd=self.folder, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while not http_ok(self.url + self.ready_path, timeout=1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.1)
        return self

    def stop(self, grace: float = 2.0) -> None:
        """End the server and its children (its own process group): SIGTERM, SIGKILL after `grace` s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def restart(self) -> Service:
        self.stop()
        return self.start()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _folder(folder: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


class S3Server(Service):
    """moto's S3 server; `env()` gives the boto3 variables that point at it (dummy credentials)."""

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": endpoint or self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        """A boto3 client straight to the server (not through any relay), for checks."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def new_bucket(self, prefix: str) -> str:
        """A new, empty bucket of a name no other test uses (`prefix-<random>`)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def s3_server(folder: str | os.PathLike | None = None) -> Iterator[S3Server]:
    with _folder(folder, "moto-") as where:
        port = free_port()
        argv = [executable("moto_server", "pip install 'moto[server]'"), "-H", "127.0.0.1", "-p", str(port)]
        with S3Server("moto_server", argv, port, "/moto-api/", where) as server:
            yield server.start()


@contextlib.contextmanager
def mlflow_server(folder: str | os.PathLike | None = None, ui_host: str = "",
                  store: tuple[str, str] | None = None) -> Iterator[Service]:
    """`mlflow server` over `folder/mlflow.db` (SQLite) and `folder/artifacts`; `url` is the tracking URI.

    `ui_host`: a name (mapped to 127.0.0.1 by the browser) the UI is also served under.
    `store`: (backend store URI, artifact root) of an existing store to serve instead, as `make mlflow-ui` does.
    """
    with _folder(folder, "mlflow-") as where:
        port = free_port()
        where_to = (["--backend-store-uri", store[0], "--default-artifact-root", store[1]] if store else
                    ["--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}",
                     "--artifacts-destination", str(where / "artifacts")])
        argv = [executable("mlflow", "pip install mlflow"), "server", *where_to,
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        if ui_host:  # MLflow refuses other Host headers and origins than localhost's (DNS rebinding)
            argv += ["--allowed-hosts", f"{ui_host}:{port},127.0.0.1:{port},localhost:{port}",
                     "--cors-allowed-origins", f"http://{ui_host}:{port}"]
        # Job execution would start a pool of helper processes we do not use.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with Service("mlflow", argv, port, "/health", where, env, start_timeout=120) as server:
            yield server.start()


@contextlib.contextmanager
def pushgateway(folder: str | os.PathLike | None = None) -> Iterator[Service]:
    """Debian's Prometheus Pushgateway, in memory only (no persistence file)."""
    with _folder(folder, "pushgateway-") as where:
        port = free_port()
        argv = [executable("prometheus-pushgateway", "run `make test-services` (Debian's package)"),
                f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=", "--log.level=warn"]
        with Service("pushgateway", argv, port, "/-/ready", where) as server:
            yield server.start()


class TcpRelay:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`target`; `cut()` makes the endpoint go away.

    A cut closes the listening socket (new connections are refused) and every open
    connection (transfers in flight fail); `restore()` listens again on the same port.
    `cut_after(n, down_for)` cuts once `n` more bytes have been relayed, and restores after
    `down_for` seconds unless that is None.
    """

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.relayed = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._trip_at: int | None = None
        self._down_for: float | None = None
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpRelay:
        if self._listener is not None:
            return self
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    restore = start

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._trip_at = None
            self.cuts += 1
        for s in [listener, *conns]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    stop = cut

    def cut_after(self, nbytes: int, down_for: float | None) -> None:
        with self._lock:
            self._trip_at = self.relayed + nbytes
            self._down_for = down_for

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    self.relayed += len(data)
                    trip = self._trip_at is not None and self.relayed >= self._trip_at
                    if trip:
                        self._trip_at, down_for = None, self._down_for
                if trip:
                    self.cut()
                    if down_for is not None:
                        timer = threading.Timer(down_for, self.restore)
                        timer.daemon = True
                        timer.start()
        except OSError:
            pass
        with self._lock:
            self._conns -= {src, dst}
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cut()
