"""What the service reports to Prometheus beside Serve's own ``ray_serve_*`` metrics.

Exported by each node's Ray metrics agent (the ``metrics_export_port`` of ``ray start``; Ray prefixes
the names with ``ray_``): answers per predicted digit, their confidence, requests refused and why
(each 4xx kind and the 503s of a full or slow replica), model swaps, and which model version each
replica serves. docs: docs/serving.md, "Metrics".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# Why a request got no prediction: a short, bounded set of label values.
REASONS = {400: "bad_request", 401: "unauthorized", 413: "too_large", 415: "unsupported_type",
           422: "unprocessable", 503: "unavailable"}
CONFIDENCE_BUCKETS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]


class ServiceMetrics:
    """The custom metrics of one replica (created in the replica: Ray metrics live in Ray processes)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.predictions = Counter("digits_predictions", "Images answered, by predicted digit.",
                                   tag_keys=("digit",))
        self.confidence = Histogram("digits_prediction_confidence", "Top probability of each answered image.",
                                    boundaries=CONFIDENCE_BUCKETS)
        self.rejections = Counter("digits_rejections", "Requests answered without a prediction, by status "
                                                       "and reason.", tag_keys=("status", "reason"))
        self.swaps = Counter("digits_model_swaps", "Model swaps by outcome (ok, refused).", tag_keys=("outcome",))
        self.served = Gauge("digits_model_served", "1 for the model version this replica serves, 0 for one it "
                                                   "served before.", tag_keys=("model", "version"))

    def answered(self, predictions: list[dict[str, Any]]) -> None:
        for digit, count in Counter(p["digit"] for p in predictions).items():
            self.predictions.inc(count, tags={"digit": str(digit)})
        for prediction in predictions:
            self.confidence.observe(prediction["confidence"])

    def refused(self, status: int, reason: str | None = None) -> None:
        self.rejections.inc(tags={"status": str(status), "reason": reason or REASONS.get(status, "other")})

    def swapped(self, outcome: str, before: dict[str, str] | None, after: dict[str, str] | None) -> None:
        if before is not None:
            self.swaps.inc(tags={"outcome": outcome})
        if outcome == "ok":
            if before is not None:
                self.served.set(0, tags={"model": before["name"], "version": before["version"]})
            if after is not None:
                self.served.set(1, tags={"model": after["name"], "version": after["version"]})
