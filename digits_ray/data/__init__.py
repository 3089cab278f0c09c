"""Data layer: verified MNIST files, a deterministic train/validation split, augmentation."""
