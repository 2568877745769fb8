"""storage: local paths and s3:// URIs, against moto's standalone S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import pytest
from services import TcpRelay

from cdsp_core import storage
from cdsp_core.errors import CdspError

MB = 1024 * 1024


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A fresh bucket on the session's server (boto3's variables point at it: conftest's `s3`)."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.2)
    return s3.new_bucket("b")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(3000), "sub/deeper/c.png": b"\x89PNG fake"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def big_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_folder_and_file_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    uri = f"s3://{bucket}/data/set1"
    assert storage.is_remote(uri) and not storage.is_remote(str(src))
    assert not storage.exists(uri)

    assert sorted(storage.upload_dir(src, uri)) == sorted(files)
    assert storage.exists(uri) and storage.exists(f"{uri}/sub/b.bin")
    assert not storage.exists(f"{uri}/sub/missing.bin")
    assert storage.list_files(uri) == sorted(files)
    assert storage.list_files(f"s3://{bucket}/data") == sorted(f"set1/{k}" for k in files)
    assert storage.read_bytes(f"{uri}/a.txt") == b"alpha"

    dest = tmp_path / "dest"
    storage.download_dir(uri, dest)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert no_temp_files(tmp_path)

    storage.download_file(f"{uri}/sub/b.bin", tmp_path / "one" / "b.bin")
    assert (tmp_path / "one" / "b.bin").read_bytes() == files["sub/b.bin"]
    storage.upload_file(tmp_path / "one" / "b.bin", f"s3://{bucket}/single/b.bin")
    assert storage.read_bytes(f"s3://{bucket}/single/b.bin") == files["sub/b.bin"]


def test_local_paths_use_the_same_api(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    out = tmp_path / "out"
    storage.upload_dir(src, str(out))
    assert storage.list_files(str(out)) == sorted(files)
    storage.download_dir(str(out), tmp_path / "back")
    assert storage.list_files(str(tmp_path / "back")) == sorted(files)
    assert storage.read_bytes(str(out / "a.txt")) == b"alpha"
    storage.download_file(f"file://{out / 'a.txt'}", tmp_path / "x.txt")
    assert (tmp_path / "x.txt").read_bytes() == b"alpha"
    with pytest.raises(CdspError, match="unsupported URI scheme"):
        storage.list_files("gs://bucket/data")


def test_multipart_round_trip_with_small_threshold(bucket, s3, tmp_path):
    src = big_file(tmp_path / "big.bin", 11 * MB)
    uri = f"s3://{bucket}/models/big.bin"
    storage.upload_file(src, uri, multipart_threshold=5 * MB)
    head = s3.client().head_object(Bucket=bucket, Key="models/big.bin")
    assert head["ContentLength"] == 11 * MB
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 1 MB

    dest = storage.download_file(uri, tmp_path / "down" / "big.bin", multipart_threshold=5 * MB)
    assert sha256(dest) == sha256(src)
    assert no_temp_files(tmp_path)


def test_size_limits_refuse_before_download(bucket, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    uri = f"s3://{bucket}/d"
    storage.upload_dir(src, uri)
    with pytest.raises(CdspError, match=r"sub/b\.bin: 3000 bytes, over the limit of 1000"):
        storage.read_bytes(f"{uri}/sub/b.bin", max_bytes=1000)
    with pytest.raises(CdspError, match="over the limit"):
        storage.download_file(f"{uri}/sub/b.bin", tmp_path / "x.bin", max_bytes=1000)
    assert not (tmp_path / "x.bin").exists()

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("kept")
    with pytest.raises(CdspError, match="over the limit"):
        storage.download_dir(uri, dest, max_bytes=1000)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]  # untouched
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("key, problem", [
    ("a/../../evil.txt", "'..' path segment"),
    ("a//b.txt", "empty path segment"),
    ("a/./b.txt", "'.' path segment"),
])
def test_unsafe_keys_never_leave_the_target_folder(bucket, s3, tmp_path, key, problem):
    raw = s3.client()
    raw.put_object(Bucket=bucket, Key="data/good.txt", Body=b"ok")
    raw.put_object(Bucket=bucket, Key=f"data/{key}", Body=b"bad")
    dest = tmp_path / "nest" / "dest"
    with pytest.raises(CdspError) as err:
        storage.download_dir(f"s3://{bucket}/data", dest)
    assert key in str(err.value) and problem in str(err.value)
    assert not dest.exists() and not (tmp_path / "nest" / "evil.txt").exists()
    assert list(tmp_path.rglob("*.txt")) == []


def test_unsafe_uris_are_refused(bucket, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    for uri in (f"s3://{bucket}/a/../b.txt", f"s3://{bucket}//b.txt", "s3:///no-bucket"):
        with pytest.raises(CdspError, match="key|bucket"):
            storage.upload_file(f, uri)
    with pytest.raises(CdspError, match="empty key"):
        storage.download_file(f"s3://{bucket}/", tmp_path / "y")


def test_missing_objects_and_buckets_name_the_uri(bucket, tmp_path):
    with pytest.raises(CdspError, match=rf"s3://{bucket}/nope\.txt: no such object"):
        storage.read_bytes(f"s3://{bucket}/nope.txt")
    with pytest.raises(CdspError, match="no objects under this prefix"):
        storage.download_dir(f"s3://{bucket}/empty", tmp_path / "d")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(CdspError, match=r"s3://no-such-bucket-\w+/f\.txt: no such bucket"):
        storage.upload_file(f, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/f.txt")
    assert not (tmp_path / "d").exists()


def test_upload_survives_the_endpoint_going_away_mid_transfer(bucket, s3, tmp_path, monkeypatch):
    src = big_file(tmp_path / "big.bin", 11 * MB)
    with TcpRelay(s3.port) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.url)
        # Away inside the first parts, for less time than the retries wait (0.2 + 0.4 + 0.8 s).
        relay.cut_after(3 * MB, down_for=0.3)
        storage.upload_file(src, f"s3://{bucket}/up/big.bin", multipart_threshold=5 * MB, attempts=4)
        assert relay.cuts == 1
    raw = s3.client()
    dest = tmp_path / "check.bin"
    raw.download_file(bucket, "up/big.bin", str(dest))
    assert sha256(dest) == sha256(src)
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_download_survives_the_endpoint_going_away_mid_transfer(bucket, s3, tmp_path, monkeypatch):
    src = big_file(tmp_path / "big.bin", 11 * MB)
    s3.client().upload_file(str(src), bucket, "down/big.bin")
    (tmp_path / "tree").mkdir()
    s3.client().upload_file(str(src), bucket, "tree/x/big.bin")
    with TcpRelay(s3.port) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.url)
        relay.cut_after(4 * MB, down_for=0.3)  # shorter than the retries wait, as above
        dest = storage.download_file(f"s3://{bucket}/down/big.bin", tmp_path / "out" / "big.bin",
                                     multipart_threshold=5 * MB, attempts=4)
        assert relay.cuts == 1 and sha256(dest) == sha256(src)
        relay.cut_after(2 * MB, down_for=0.3)
        storage.download_dir(f"s3://{bucket}/tree", tmp_path / "tree", attempts=4)  # one GET this time
        assert relay.cuts == 2 and sha256(tmp_path / "tree" / "x" / "big.bin") == sha256(src)
    assert no_temp_files(tmp_path)


def test_endpoint_that_stays_away_fails_clearly_and_leaves_nothing(bucket, s3, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # keep botocore's own retries short for the test
    src = big_file(tmp_path / "big.bin", 11 * MB)
    s3.client().put_object(Bucket=bucket, Key="there.bin", Body=b"x" * 5000)
    with TcpRelay(s3.port) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.url)
        relay.cut_after(3 * MB, down_for=None)
        with caplog.at_level(logging.WARNING, "cdsp_core.storage"):
            with pytest.raises(CdspError) as err:
                storage.upload_file(src, f"s3://{bucket}/gone/big.bin", multipart_threshold=5 * MB, attempts=2)
        assert f"s3://{bucket}/gone/big.bin: failed after 2 attempts" in str(err.value)
        assert "retrying" in caplog.text and "testing" not in caplog.text  # no credentials in logs

        with pytest.raises(CdspError, match="failed after 2 attempts"):
            storage.download_file(f"s3://{bucket}/there.bin", tmp_path / "out" / "there.bin", attempts=2)
        assert not (tmp_path / "out" / "there.bin").exists() and no_temp_files(tmp_path)

    raw = s3.client()  # straight to the server: no object, whole or partial, under the key
    assert raw.list_objects_v2(Bucket=bucket, Prefix="gone/").get("KeyCount") == 0
