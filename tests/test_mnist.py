"""The MNIST data layer against real files, good and deliberately broken."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from digits_ray.data import mnist
from digits_ray.data.mnist import (
    FILES,
    ChecksumMismatchError,
    CorruptFileError,
    CountMismatchError,
    DownloadError,
    MnistDataError,
    MnistFile,
    MnistFileMissingError,
    load_split,
)
from tests.conftest import CANONICAL_FILES


def write_manifest(folder: Path) -> None:
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.glob("*.gz"))]
    (folder / mnist.MANIFEST_NAME).write_text("\n".join(lines) + "\n")


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else mnist._IDX_MAGIC[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


@pytest.fixture
def broken_copy(small_mnist, tmp_path):
    """A copy of the small subset; a test breaks one file, then re-declares the manifest."""
    folder = tmp_path / "mnist"
    shutil.copytree(small_mnist, folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    return folder


# --- Reading good files ---------------------------------------------------------------------


def test_small_subset_loads_with_its_manifest(small_mnist):
    train, test = load_split("train", small_mnist), load_split("test", small_mnist)
    assert train.images.shape == (5000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (1000, 28, 28) and test.labels.shape == (1000,)
    assert set(np.unique(train.labels)) == set(range(10))
    assert train.md5["train-images-idx3-ubyte.gz"] == "7d9bf810e5ec0cf034f1ad79eb20bf00"
    # Real MNIST: mean pixel of the first 5,000 training images is close to the full set's 33.3.
    assert 30 < train.images.mean() < 37


def test_data_dir_variable_is_read_first(small_mnist, monkeypatch):
    monkeypatch.setenv("DIGITS_DATA_DIR", str(small_mnist))
    assert len(load_split("test")) == 1000


def test_bad_split_name():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_split("validation")


# --- Error paths, each with a real broken file ----------------------------------------------


def test_missing_file_names_file_and_variable(broken_copy, monkeypatch):
    (broken_copy / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("DIGITS_DATA_DIR", str(broken_copy))
    with pytest.raises(MnistFileMissingError, match="t10k-labels-idx1-ubyte.gz.*DIGITS_DATA_DIR"):
        load_split("test")


def test_offline_cache_miss_says_which_file_and_variable(monkeypatch):
    monkeypatch.setenv("DIGITS_OFFLINE", "1")
    with pytest.raises(MnistFileMissingError, match="train-images-idx3-ubyte.gz.*DIGITS_OFFLINE=1.*DIGITS_DATA_DIR"):
        load_split("train")


def test_non_canonical_folder_without_manifest_fails_checksum(broken_copy):
    (broken_copy / mnist.MANIFEST_NAME).unlink()
    with pytest.raises(ChecksumMismatchError, match="published checksum.*checksums.md5"):
        load_split("test", broken_copy)


def test_file_that_differs_from_its_manifest(broken_copy):
    path = broken_copy / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="t10k-images-idx3-ubyte.gz: md5 is"):
        load_split("test", broken_copy)


def test_manifest_without_entry(broken_copy):
    manifest = broken_copy / mnist.MANIFEST_NAME
    manifest.write_text("\n".join(l for l in manifest.read_text().splitlines() if "t10k-labels" not in l))
    with pytest.raises(MnistDataError, match="lists no checksum for t10k-labels"):
        load_split("test", broken_copy)


def test_malformed_manifest(broken_copy):
    (broken_copy / mnist.MANIFEST_NAME).write_text("not a checksum line\n")
    with pytest.raises(MnistDataError, match="md5sum format"):
        load_split("test", broken_copy)


def test_truncated_gzip(broken_copy):
    path = broken_copy / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="truncated"):
        load_split("test", broken_copy)


def test_not_gzip(broken_copy):
    path = broken_copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))  # the raw IDX bytes, uncompressed
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="not a gzip file"):
        load_split("test", broken_copy)


def test_wrong_idx_magic(broken_copy):
    labels = mnist.read_idx(broken_copy / "t10k-labels-idx1-ubyte.gz", 1)
    (broken_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, magic=0x00000803)))
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="IDX magic is 0x00000803, expected 0x00000801"):
        load_split("test", broken_copy)


def test_wrong_image_dimensions(broken_copy):
    images = mnist.read_idx(broken_copy / "t10k-images-idx3-ubyte.gz", 3)[:, :27, :27]
    (broken_copy / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.ascontiguousarray(images))))
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="27x27, expected 28x28"):
        load_split("test", broken_copy)


def test_header_promises_more_than_the_file_holds(broken_copy):
    labels = mnist.read_idx(broken_copy / "t10k-labels-idx1-ubyte.gz", 1)
    raw = struct.pack(">II", 0x00000801, len(labels) + 5) + labels.tobytes()
    (broken_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="header promises"):
        load_split("test", broken_copy)


def test_image_label_count_mismatch(broken_copy):
    labels = mnist.read_idx(broken_copy / "t10k-labels-idx1-ubyte.gz", 1)[:999]
    (broken_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    write_manifest(broken_copy)
    with pytest.raises(CountMismatchError, match="1000 images but t10k-labels-idx1-ubyte.gz holds 999 labels"):
        load_split("test", broken_copy)


def test_label_out_of_range(broken_copy):
    labels = mnist.read_idx(broken_copy / "t10k-labels-idx1-ubyte.gz", 1).copy()
    labels[3] = 12
    (broken_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    write_manifest(broken_copy)
    with pytest.raises(CorruptFileError, match="label 12 is outside 0-9"):
        load_split("test", broken_copy)


# --- Downloading, from a local HTTP server ---------------------------------------------------


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Serves files from ``root``; the first ``fail_first`` requests get HTTP 503."""

    root: Path
    fail_first = 0
    requests: list[str]

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        if len(type(self).requests) <= type(self).fail_first:
            self.send_error(503, "try again")
            return
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    """Start a mirror on 127.0.0.1; yields a function (root, fail_first) -> (base url, handler)."""
    servers = []

    def start(root: Path, fail_first: int = 0):
        handler = type("Handler", (_Mirror,), {"root": root, "fail_first": fail_first, "requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", handler

    yield start
    for server in servers:
        server.shutdown()


def test_download_retries_then_verifies_published_checksum(mirror, monkeypatch, tmp_path):
    url, handler = mirror(CANONICAL_FILES, fail_first=1)
    monkeypatch.setenv("DIGITS_MNIST_MIRRORS", url)
    path, md5 = mnist.locate(FILES["test_labels"])  # cache miss -> download
    assert md5 == FILES["test_labels"].md5 == "ec29112dd5afa0611ce80d1b7f02629c"
    assert len(handler.requests) == 2  # one 503, one success
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .part file left behind
    assert mnist.read_idx(path, 1).shape == (10_000,)
    mnist.locate(FILES["test_labels"])  # cached now: no new request
    assert len(handler.requests) == 2


def test_download_skips_a_mirror_with_a_wrong_file(mirror, monkeypatch, tmp_path, small_mnist):
    wrong_url, wrong = mirror(small_mnist)  # serves the subset's labels file under the canonical name
    good_url, good = mirror(CANONICAL_FILES)
    spec = FILES["test_labels"]
    monkeypatch.setenv("DIGITS_MNIST_MIRRORS", f"{wrong_url},{good_url}")
    path = mnist.download(spec, tmp_path, attempts=1)
    assert mnist.md5_of(path) == spec.md5
    assert wrong.requests == good.requests == ["/t10k-labels-idx1-ubyte.gz"]  # tried first, then skipped
    assert [p.name for p in tmp_path.iterdir()] == [spec.name]  # the rejected download is gone


def test_download_failure_lists_every_try(mirror, monkeypatch, tmp_path):
    url, handler = mirror(tmp_path / "empty")  # 404 for everything
    monkeypatch.setenv("DIGITS_MNIST_MIRRORS", url)
    spec = MnistFile("t10k-labels-idx1-ubyte.gz", FILES["test_labels"].md5, 10_000)
    with pytest.raises(DownloadError, match=r"(?s)t10k-labels-idx1-ubyte.gz \(2 tries\).*404.*DIGITS_DATA_DIR"):
        mnist.download(spec, tmp_path / "cache", attempts=2)
    assert len(handler.requests) == 2
    assert not list((tmp_path / "cache").iterdir())
