"""Local paths and `s3://bucket/prefix` URIs through one small API (boto3).

The S3 endpoint comes from boto3's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO and
other S3-compatible stores), credentials from boto3's usual chain (env, profile, IAM role);
neither is ever logged. Requests are retried by botocore (standard mode unless
`AWS_RETRY_MODE` says otherwise) and whole transfers once more around that when the
connection drops, with backoff. Objects at or above `multipart_threshold` go up and down in
parts (boto3's TransferConfig).

Safety: every object key is checked before it becomes a local path, so nothing lands outside
the target folder; downloads land under a temporary name and are renamed into place (a folder
is built aside and swapped in); an upload is a single PUT or a multipart upload that is either
completed or aborted, so a failed upload leaves no object under its key.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

from cdsp_core import outputs
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_dir, atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

MB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MB  # objects at least this big are transferred in parts
MIN_PART_SIZE = 5 * MB  # S3's smallest part (all but the last)
READ_LIMIT = 64 * MB  # default max_bytes of read_bytes
TRANSFER_ATTEMPTS = 3  # whole-transfer attempts around botocore's per-request retries
BACKOFF_S = 1.0  # first wait between whole-transfer attempts (doubles)
THREADS = 8  # files transferred at once by download_dir / upload_dir

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- URIs and keys -------------------------------------------------------------------------

def is_remote(uri: str | os.PathLike) -> bool:
    """True for `s3://` URIs; plain paths are local."""
    return str(uri).startswith("s3://")


def _local(uri: str | os.PathLike) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if _SCHEME.match(text):
        raise CdspError(f"{text}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
    return Path(text)


def check_key(key: str, where: str) -> str:
    """Return `key` (a relative, '/'-separated path) if it is safe to join under a folder.

    Refused, with a CdspError naming the key: empty keys, absolute keys, backslashes, NUL,
    and empty, '.' or '..' segments, so no key can point outside the target folder.
    """
    problem = outputs.unsafe(key, "key")  # the one rule for names joined under a folder
    if problem:
        raise CdspError(f"{where}: unsafe object key {key!r} ({problem}); refusing to map it to a local path")
    return key


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b"); the prefix is checked like a key (may be empty)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise CdspError(f"{uri}: no bucket in the S3 URI (expected s3://bucket/prefix)")
    prefix = prefix[:-1] if prefix.endswith("/") else prefix
    if prefix:
        check_key(prefix, uri)
    return bucket, prefix


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


# --- the client and its errors -------------------------------------------------------------

# boto3's variables that shape a client: a change of any of them gives a new client.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REQUEST_CHECKSUM_CALCULATION",
               "AWS_RESPONSE_CHECKSUM_VALIDATION")


def client():
    """A boto3 S3 client: endpoint and credentials from boto3's own variables, retries with backoff.

    botocore retries each request (mode `standard` and 5 attempts unless `AWS_RETRY_MODE` /
    `AWS_MAX_ATTEMPTS` say otherwise). Clients are thread-safe and kept while the variables
    stay the same.
    """
    return _client_for(tuple(os.environ.get(k) for k in _CLIENT_ENV))


@functools.lru_cache(maxsize=4)
def _client_for(_env: tuple):
    import boto3
    from botocore.config import Config

    retries: dict = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard"}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = 5
    config = Config(retries=retries, connect_timeout=10, read_timeout=60, max_pool_connections=THREADS * 4)
    return boto3.session.Session().client("s3", config=config)


def _transfer_config(multipart_threshold: int):
    from boto3.s3.transfer import TransferConfig

    chunk = max(MIN_PART_SIZE, min(multipart_threshold, 16 * MB))
    return TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=chunk, max_concurrency=4)


def _status(e: BaseException) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(e: BaseException) -> bool:
    """Worth another whole-transfer attempt: the connection failed, or the server said 5xx/throttled."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError

    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError, HTTPError,
                      ConnectionError)):
        return True
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        return _status(e) >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "ThrottlingException")
    if isinstance(e, S3UploadFailedError):  # wraps the ClientError or connection error of a part
        return e.__context__ is not None and _transient(e.__context__)
    return False


def _explain(e: BaseException) -> str:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, S3UploadFailedError) and e.__context__ is not None:
        return _explain(e.__context__)
    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or run with an IAM role)")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code, status = err.get("Code", "?"), _status(e)
        if code == "NoSuchBucket":
            return "no such bucket"
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return "no such object"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return f"access denied ({code}); check the credentials and the bucket policy"
        return f"{code}: {err.get('Message', '')}".strip()
    return f"{type(e).__name__}: {e}"


def _with_retries(what: str, fn: Callable[[], T], attempts: int) -> T:
    """Run one whole transfer, again on connection errors, with exponential backoff; CdspError at last."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (BotoCoreError, ClientError, Boto3Error, OSError) as e:
            if not _transient(e):
                raise CdspError(f"{what}: {_explain(e)}") from e
            if attempt == attempts:
                raise CdspError(f"{what}: failed after {attempts} attempts: {_explain(e)}") from e
            wait = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, _explain(e), wait, attempt + 1,
                        attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _head(s3, bucket: str, key: str, uri: str, attempts: int) -> int:
    """Size of an object (CdspError if it is missing)."""
    return int(_with_retries(uri, lambda: s3.head_object(Bucket=bucket, Key=key), attempts)["ContentLength"])


def _check_size(uri: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise CdspError(f"{uri}: {size} bytes, over the limit of {max_bytes} bytes; refusing to download it")


# --- listing -------------------------------------------------------------------------------

def _list_s3(s3, uri: str, attempts: int) -> list[tuple[str, int, str]]:
    """(relative key, size, ETag) of every object under an S3 folder URI, keys checked."""
    bucket, prefix = split_s3(uri)
    start = f"{prefix}/" if prefix else ""

    def list_all() -> list[tuple[str, int, str]]:
        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(start):]
                if rel.endswith("/") and obj["Size"] == 0:
                    continue  # a "folder" marker made by consoles
                found.append((check_key(rel, f"s3://{bucket}/{obj['Key']}"), int(obj["Size"]), obj.get("ETag", "")))
        return found

    return sorted(_with_retries(uri, list_all, attempts))


def list_files(uri: str, *, attempts: int = TRANSFER_ATTEMPTS) -> list[str]:
    """Relative paths ('/'-separated, sorted) of every file under a folder path or S3 prefix."""
    if is_remote(uri):
        return [rel for rel, _, _ in _list_s3(client(), uri, attempts)]
    root = _local(uri)
    if not root.is_dir():
        raise CdspError(f"{uri}: not a folder")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def list_versions(uri: str, *, attempts: int = TRANSFER_ATTEMPTS) -> dict[str, tuple[int, str]]:
    """{relative path: (size, version)} of every file under a folder path or S3 prefix, from one listing.

    The version of an object is its ETag (S3 gives a new one whenever an object is written with
    other bytes); of a local file, its modification time in nanoseconds. `download_version`
    fetches exactly that version, or fails.
    """
    if is_remote(uri):
        return {rel: (size, etag) for rel, size, etag in _list_s3(client(), uri, attempts)}
    root = _local(uri)
    if not root.is_dir():
        raise CdspError(f"{uri}: not a folder")
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, str(st.st_mtime_ns))
    return dict(sorted(out.items()))


def is_file(uri: str, *, attempts: int = TRANSFER_ATTEMPTS) -> bool:
    """True if `uri` is a file or object (one HEAD request on S3)."""
    if not is_remote(uri):
        return _local(uri).is_file()
    from botocore.exceptions import ClientError

    s3 = client()
    bucket, key = split_s3(uri)
    check_key(key, uri)

    def head() -> bool:
        try:
            s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _status(e) == 404:
                return False
            raise

    return _with_retries(uri, head, attempts)


def exists(uri: str, *, attempts: int = TRANSFER_ATTEMPTS) -> bool:
    """True if `uri` is a file/object, or a folder/prefix holding at least one object."""
    if not is_remote(uri):
        return _local(uri).exists()
    from botocore.exceptions import ClientError

    s3 = client()
    bucket, key = split_s3(uri)
    if key:
        try:
            s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _status(e) != 404:
                raise CdspError(f"{uri}: {_explain(e)}") from e
    start = f"{key}/" if key else ""
    page = _with_retries(uri, lambda: s3.list_objects_v2(Bucket=bucket, Prefix=start, MaxKeys=1), attempts)
    return page.get("KeyCount", 0) > 0


# --- single files --------------------------------------------------------------------------

def delete(uri: str, *, attempts: int = TRANSFER_ATTEMPTS) -> bool:
    """Remove one file or object if it is there; True if something was removed."""
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_file():
            return False
        path.unlink()
        return True
    if not is_file(uri, attempts=attempts):
        return False
    bucket, key = split_s3(uri)
    _with_retries(uri, lambda: client().delete_object(Bucket=bucket, Key=key), attempts)
    return True



def read_bytes(uri: str, max_bytes: int = READ_LIMIT, *, attempts: int = TRANSFER_ATTEMPTS) -> bytes:
    """The content of a file or object, refused (before reading) if it is over `max_bytes`."""
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_file():
            raise CdspError(f"{uri}: no such file")
        _check_size(str(uri), path.stat().st_size, max_bytes)
        return path.read_bytes()
    s3 = client()
    bucket, key = split_s3(uri)
    check_key(key, uri)
    _check_size(uri, _head(s3, bucket, key, uri, attempts), max_bytes)

    def get() -> bytes:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        data = body.read(max_bytes + 1)  # the object may have grown since the HEAD
        body.close()
        return data

    data = _with_retries(uri, get, attempts)
    _check_size(uri, len(data), max_bytes)
    return data


class ObjectChanged(CdspError):
    """A file or object is no longer the version its listing gave: it was changed or removed since."""


_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')  # the ETag of an object not uploaded in parts: its MD5


def download_version(uri: str, dest: str | os.PathLike, *, size: int, version: str, max_bytes: int | None = None,
                     attempts: int = TRANSFER_ATTEMPTS) -> str:
    """Copy exactly the listed version (`list_versions`) of a file or object to `dest`; its SHA-256.

    S3: one GET with `If-Match: <ETag>`, so the store itself refuses any other version (HTTP 412);
    the bytes are checked against the listed size and, where the ETag is the MD5 of the content,
    against that. A local file: its size and modification time before and after the copy. Any
    mismatch raises ObjectChanged, and `dest` does not appear.
    """
    dest = Path(dest)
    _check_size(uri, size, max_bytes)
    if not is_remote(uri):
        src = _local(uri)

        def changed() -> bool:
            try:
                st = src.stat()
            except FileNotFoundError:
                return True
            return (st.st_size, str(st.st_mtime_ns)) != (size, version)

        with atomic_path(dest) as tmp:
            if changed():
                raise ObjectChanged(f"{uri}: changed or removed since the folder was listed")
            with open(src, "rb") as fh:
                sha256, _ = _copy_hashing(fh, tmp)
            if changed():
                raise ObjectChanged(f"{uri}: changed while it was read")
        return sha256
    from botocore.exceptions import ClientError

    s3 = client()
    bucket, key = split_s3(uri)
    check_key(key, uri)
    md5 = _MD5_ETAG.match(version)

    def once() -> str:
        with atomic_path(dest) as tmp:
            try:
                body = s3.get_object(Bucket=bucket, Key=key, IfMatch=version)["Body"]
            except ClientError as e:
                if _status(e) in (404, 412):
                    raise ObjectChanged(f"{uri}: changed or removed since the prefix was listed (ETag {version} "
                                        f"{'is gone' if _status(e) == 412 else 'and the object are gone'})") from e
                raise
            sha256, got_md5 = _copy_hashing(body, tmp)
            body.close()
            got = tmp.stat().st_size
            if got != size:  # a truncated body is never renamed into place; try again
                raise ConnectionError(f"downloaded {got} of {size} bytes")
            if md5 and got_md5 != md5.group(1):
                raise ObjectChanged(f"{uri}: the bytes read do not match its ETag {version} (MD5 {got_md5})")
        return sha256

    return _with_retries(uri, once, attempts)


def _copy_hashing(src, dest: Path) -> tuple[str, str]:
    """Copy a readable stream to `dest`; the SHA-256 and MD5 of what was copied."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(dest, "wb") as fh:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            sha256.update(chunk)
            md5.update(chunk)
            fh.write(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def write_bytes(uri: str, data: bytes, *, attempts: int = TRANSFER_ATTEMPTS) -> str:
    """Write a small file or object whole: a local file renamed into place, an S3 object in one PUT."""
    if not is_remote(uri):
        atomic_write_bytes(_local(uri), data)
        return uri
    s3 = client()
    bucket, key = split_s3(uri)
    check_key(key, uri)
    _with_retries(uri, lambda: s3.put_object(Bucket=bucket, Key=key, Body=data), attempts)
    return uri


def download_file(uri: str, dest: str | os.PathLike, *, max_bytes: int | None = None,
                  multipart_threshold: int = MULTIPART_THRESHOLD, attempts: int = TRANSFER_ATTEMPTS) -> Path:
    """Copy a file or object to the local path `dest`, which appears only when complete."""
    dest = Path(dest)
    if not is_remote(uri):
        src = _local(uri)
        if not src.is_file():
            raise CdspError(f"{uri}: no such file")
        _check_size(str(uri), src.stat().st_size, max_bytes)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
    s3 = client()
    bucket, key = split_s3(uri)
    check_key(key, uri)
    size = _head(s3, bucket, key, uri, attempts)
    _check_size(uri, size, max_bytes)
    _download(s3, bucket, key, dest, size, _transfer_config(multipart_threshold), attempts)
    return dest


def _download(s3, bucket: str, key: str, dest: Path, size: int, config, attempts: int) -> None:
    uri = f"s3://{bucket}/{key}"

    def once() -> None:
        with atomic_path(dest) as tmp:
            if size >= config.multipart_threshold:  # ranged GETs in parallel
                s3.download_file(bucket, key, str(tmp), Config=config)
            else:  # one GET: much cheaper than a transfer manager for the many small files of a dataset
                body = s3.get_object(Bucket=bucket, Key=key)["Body"]
                with open(tmp, "wb") as fh:
                    shutil.copyfileobj(body, fh, 1024 * 1024)
                body.close()
            got = tmp.stat().st_size
            if got != size:  # a truncated body is never renamed into place; try again
                raise ConnectionError(f"downloaded {got} of {size} bytes")

    _with_retries(uri, once, attempts)


def upload_file(src: str | os.PathLike, uri: str, *, multipart_threshold: int = MULTIPART_THRESHOLD,
                attempts: int = TRANSFER_ATTEMPTS) -> str:
    """Copy the local file `src` to a path or object; a failed upload leaves nothing under `uri`."""
    src = Path(src)
    if not src.is_file():
        raise CdspError(f"{src}: no such file to upload")
    if not is_remote(uri):
        with atomic_path(_local(uri)) as tmp:
            shutil.copyfile(src, tmp)
        return str(uri)
    bucket, key = split_s3(uri)
    check_key(key, uri)
    _upload(client(), src, bucket, key, _transfer_config(multipart_threshold), attempts)
    return uri


def _upload(s3, src: Path, bucket: str, key: str, config, attempts: int) -> None:
    uri = f"s3://{bucket}/{key}"
    created = _track_multipart_uploads(s3)
    try:
        _with_retries(uri, lambda: s3.upload_file(str(src), bucket, key, Config=config), attempts)
    finally:
        # boto3 aborts a failed multipart upload itself, unless the endpoint was away at that
        # moment; abort what is left of ours now, so that no parts linger in the bucket.
        ours = created.pop(key, None)
        if ours:
            _abort_multipart(s3, bucket, key, ours)


def _track_multipart_uploads(s3) -> dict[str, set[str]]:
    """Record the multipart uploads this client starts: {key: {upload id}}."""
    created = getattr(s3, "_cdsp_multipart", None)
    if created is None:
        created = s3._cdsp_multipart = {}

        def on_create(parsed, **_) -> None:
            if "UploadId" in parsed and "Key" in parsed:
                created.setdefault(parsed["Key"], set()).add(parsed["UploadId"])

        s3.meta.events.register("after-call.s3.CreateMultipartUpload", on_create)
    return created


def _abort_multipart(s3, bucket: str, key: str, ours: set[str]) -> None:
    try:
        uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        for up in uploads:
            if up["Key"] == key and up["UploadId"] in ours:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
    except Exception as e:  # best effort: incomplete uploads are invisible and expire by lifecycle rule
        log.warning("s3://%s/%s: could not abort an incomplete multipart upload: %s", bucket, key, _explain(e))


# --- folders -------------------------------------------------------------------------------

def download_dir(uri: str, dest_dir: str | os.PathLike, *, max_bytes: int | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, attempts: int = TRANSFER_ATTEMPTS) -> Path:
    """Copy every file under a folder path or S3 prefix to `dest_dir`.

    The copy is built in a temporary folder beside `dest_dir` and swapped in when complete,
    so `dest_dir` (replaced as a whole) is never half-written. `max_bytes` limits each file,
    checked from the listing before anything is downloaded.
    """
    dest = Path(dest_dir)
    if not is_remote(uri):
        src = _local(uri)
        if not src.is_dir():
            raise CdspError(f"{uri}: not a folder")
        if src.resolve() == dest.resolve():
            return dest
        files = list_files(str(src))
        for rel in files:
            _check_size(str(src / rel), (src / rel).stat().st_size, max_bytes)
        with atomic_dir(dest) as tmp:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
        return dest
    s3 = client()
    bucket, prefix = split_s3(uri)
    objects = _list_s3(s3, uri, attempts)
    if not objects:
        raise CdspError(f"{uri}: no objects under this prefix")
    for rel, size, _ in objects:
        _check_size(f"s3://{bucket}/{_join(prefix, rel)}", size, max_bytes)
    config = _transfer_config(multipart_threshold)
    with atomic_dir(dest) as tmp:
        def fetch(item: tuple[str, int, str]) -> None:
            rel, size, _ = item
            _download(s3, bucket, _join(prefix, rel), tmp / rel, size, config, attempts)

        parallel(fetch, objects)
    log.info("downloaded %d files from %s to %s", len(objects), uri, dest)
    return dest


def upload_dir(src_dir: str | os.PathLike, uri: str, *, multipart_threshold: int = MULTIPART_THRESHOLD,
               attempts: int = TRANSFER_ATTEMPTS) -> list[str]:
    """Copy every file under the local folder `src_dir` to a folder path or S3 prefix.

    Files already there under other names are kept; each file lands whole or not at all.
    Returns the relative paths copied.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise CdspError(f"{src}: not a folder to upload")
    files = list_files(str(src))
    if not is_remote(uri):
        dest = _local(uri)
        for rel in files:
            with atomic_path(dest / check_key(rel, str(src / rel))) as tmp:
                shutil.copyfile(src / rel, tmp)
        return files
    s3 = client()
    bucket, prefix = split_s3(uri)
    config = _transfer_config(multipart_threshold)
    parallel(lambda rel: _upload(s3, src / rel, bucket, check_key(_join(prefix, rel), uri), config, attempts), files)
    log.info("uploaded %d files from %s to %s", len(files), src, uri)
    return files


def parallel(fn: Callable[[T], None], items: list[T]) -> None:
    """fn over items on a few threads (THREADS); after the first error the rest is cancelled and it is raised."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [pool.submit(fn, item) for item in items]
        for f in as_completed(futures):
            if f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()
