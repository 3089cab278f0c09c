"""Data layer: verified MNIST files, a deterministic train/validation split, augmentation, and the
connection to Ray whose processes all read the same data folder."""
