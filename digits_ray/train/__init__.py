"""Training: single-process Keras and Ray Train share one model, schedule and artifact; checkpoints and
MLflow tracking of runs."""
