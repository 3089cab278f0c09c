"""Ray Tune: search architecture, batch size, LR and augmentation; the winner is tested once and published."""
