"""Where MNIST files come from: the environment variables that name folders and mirrors.

Read by the data loader, and by ``ray_backend`` so that every Ray process sees the same data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "DIGITS_DATA_DIR"  # folder with the four IDX files; read first, never downloaded into
CACHE_DIR_ENV = "DIGITS_CACHE_DIR"  # where downloads are cached (default ~/.cache/digits-ray)
OFFLINE_ENV = "DIGITS_OFFLINE"  # "1": never touch the network
MIRRORS_ENV = "DIGITS_MNIST_MIRRORS"  # comma-separated base URLs overriding the public mirrors

# Public mirrors of the original IDX files: the one TensorFlow Datasets uses, then torchvision's.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)


def data_dir_from_env() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Folder where downloaded MNIST files are kept between runs."""
    default = Path.home() / ".cache" / "digits-ray"
    return Path(os.environ.get(CACHE_DIR_ENV, default)).expanduser() / "mnist"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


def mirrors() -> list[str]:
    override = os.environ.get(MIRRORS_ENV)
    bases = override.split(",") if override else list(MNIST_MIRRORS)
    return [b.strip().rstrip("/") + "/" for b in bases if b.strip()]
