"""MNIST from the four original IDX gzip files, verified before a single pixel is used.

Where the files come from, in order:
1. ``$DIGITS_DATA_DIR`` when set: read as is, never downloaded into (offline use).
2. The cache folder (``$DIGITS_CACHE_DIR``/mnist), filled from public mirrors when a file is missing,
   unless ``$DIGITS_OFFLINE=1``.

Every file is checked against MNIST's published md5. A folder that is *not* canonical MNIST
(such as the test subset) must declare itself with a ``checksums.md5`` manifest beside the files;
verification is never skipped.

Downloading (retries, progress bar, hash check, atomic rename) is pooch's job. The IDX reader and the
checksum policy stay ours: they give every kind of broken file an error that says how to fix it, and
accept declared subsets, which no library does for this format.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits_ray.data import locations
from digits_ray.data.locations import DATA_DIR_ENV, OFFLINE_ENV
from digits_ray.errors import ConfigError, DigitsError
from digits_ray.schema import IMAGE_SIZE, NUM_CLASSES

MANIFEST_NAME = "checksums.md5"


@dataclass(frozen=True)
class MnistFile:
    name: str
    md5: str  # published checksum of the canonical file
    count: int  # items in the canonical file


FILES = {
    "train_images": MnistFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 60_000),
    "train_labels": MnistFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 60_000),
    "test_images": MnistFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 10_000),
    "test_labels": MnistFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 10_000),
}

# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


class MnistDataError(DigitsError):
    """Base class: something about the MNIST files on disk is wrong."""


class MnistFileMissingError(MnistDataError, FileNotFoundError):
    pass


class ChecksumMismatchError(MnistDataError):
    pass


class CorruptFileError(MnistDataError):
    """Not gzip, truncated, or not a well-formed IDX file."""


class CountMismatchError(MnistDataError):
    pass


class DownloadError(MnistDataError):
    pass


@dataclass(frozen=True)
class MnistSplit:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one of MNIST's two official splits."""

    images: np.ndarray
    labels: np.ndarray
    md5: dict[str, str]  # file name -> verified checksum, recorded in artifact metadata

    def __len__(self) -> int:
        return len(self.labels)


# --- Locating and verifying files -----------------------------------------------------------


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, str] | None:
    """Checksums a non-canonical folder declares for itself (md5sum format), or None."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None
    expected = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise MnistDataError(
                f"{manifest}:{number}: expected '<md5>  <file name>' (md5sum format), got {line!r}"
            )
        expected[parts[1].lstrip("*")] = parts[0].lower()
    return expected


def verify_checksum(path: Path, expected_md5: str, source: str) -> str:
    actual = md5_of(path)
    if actual != expected_md5:
        raise ChecksumMismatchError(
            f"{path}: md5 is {actual}, but {source} says {expected_md5}. The file is damaged or is not "
            f"the original MNIST file; delete it to re-download it, or, for a deliberate subset, list its "
            f"checksum in a {MANIFEST_NAME} beside it."
        )
    return actual


def _expected_md5(folder: Path, spec: MnistFile) -> tuple[str, str]:
    manifest = read_manifest(folder)
    if manifest is None:
        return spec.md5, "MNIST's published checksum"
    if spec.name not in manifest:
        raise MnistDataError(
            f"{folder / MANIFEST_NAME} declares this folder non-canonical but lists no checksum for "
            f"{spec.name}; add a line '<md5>  {spec.name}'."
        )
    return manifest[spec.name], f"the manifest {folder / MANIFEST_NAME}"


def locate(spec: MnistFile, data_dir: Path | None = None) -> tuple[Path, str]:
    """Path of a verified copy of one file (downloading it if allowed) and its md5."""
    folder = data_dir if data_dir is not None else locations.data_dir_from_env()
    if folder is not None:
        folder = Path(folder).expanduser()
        path = folder / spec.name
        if not path.is_file():
            raise MnistFileMissingError(
                f"{spec.name} is not in {folder} (named by {DATA_DIR_ENV}, or passed as data_dir). "
                f"Put the four MNIST IDX .gz files there, or unset {DATA_DIR_ENV} to download them."
            )
        expected, source = _expected_md5(folder, spec)
        return path, verify_checksum(path, expected, source)

    folder = locations.cache_dir()
    path = folder / spec.name
    if not path.is_file():
        if locations.offline():
            raise MnistFileMissingError(
                f"{spec.name} is not in the cache {folder} and {OFFLINE_ENV}=1 forbids downloading "
                f"it. Set {DATA_DIR_ENV} to a folder holding the four MNIST IDX .gz files."
            )
        download(spec, folder)
    return path, verify_checksum(path, spec.md5, "MNIST's published checksum")


# --- Downloading ----------------------------------------------------------------------------


def download(spec: MnistFile, folder: Path, attempts: int = 3, timeout_s: float = 30.0) -> Path:
    """Fetch one file from the first mirror that serves it with the published md5.

    pooch streams it to a temporary file, checks the hash, retries failures and renames it into place.
    """
    import pooch
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for base in locations.mirrors():
        source = pooch.create(path=folder, base_url=base, registry={spec.name: f"md5:{spec.md5}"},
                              retry_if_failed=attempts - 1)
        downloader = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=timeout_s)
        try:
            return Path(source.fetch(spec.name, downloader=downloader))
        except (requests.RequestException, ValueError, OSError) as err:  # ValueError: pooch's hash mismatch
            failures.append(f"{base}{spec.name} ({attempts} tries): {err}")
    raise DownloadError(
        f"could not download {spec.name}; tried:\n  " + "\n  ".join(failures) + f"\nOffline? Set "
        f"{DATA_DIR_ENV} to a folder holding the four MNIST IDX .gz files."
    )


# --- Parsing --------------------------------------------------------------------------------


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Decode one gzip'd IDX file of unsigned bytes, checking magic, shape and length."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except gzip.BadGzipFile as err:
        raise CorruptFileError(f"{path}: not a gzip file ({err}); expected an IDX .gz file") from err
    except (EOFError, zlib.error) as err:
        raise CorruptFileError(f"{path}: truncated or damaged gzip data ({err}); re-fetch the file") from err

    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise CorruptFileError(f"{path}: {len(raw)} bytes is shorter than an IDX header ({header_len})")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != _IDX_MAGIC[ndim]:
        raise CorruptFileError(
            f"{path}: IDX magic is 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    if ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise CorruptFileError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise CorruptFileError(
            f"{path}: header promises {dims} ({expected_len} bytes) but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_split(split: str, data_dir: Path | str | None = None) -> MnistSplit:
    """Load and verify ``"train"`` (60,000) or ``"test"`` (10,000).

    Callers load the test split only for final evaluation; model selection uses the
    validation part of ``"train"`` (see ``digits_ray.data.split``).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(data_dir) if data_dir is not None else None
    image_spec, label_spec = FILES[f"{split}_images"], FILES[f"{split}_labels"]
    image_path, image_md5 = locate(image_spec, folder)
    label_path, label_md5 = locate(label_spec, folder)
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if len(images) != len(labels):
        raise CountMismatchError(
            f"{image_path.name} holds {len(images)} images but {label_path.name} holds {len(labels)} "
            f"labels; the two files must come from the same set"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise CorruptFileError(f"{label_path}: label {labels.max()} is outside 0-{NUM_CLASSES - 1}")
    return MnistSplit(images, labels, {image_spec.name: image_md5, label_spec.name: label_md5})
