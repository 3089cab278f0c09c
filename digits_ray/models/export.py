"""TFLite export: float32 and full-integer int8, each measured through the TFLite interpreter.

The models take raw uint8 pixels, so both files do too: the int8 model quantizes everything after
its input cast, calibrated on training images, and returns uint8 probabilities (scale 1/256).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray.models.metrics import classification_metrics

FLOAT32_FILE = "model_float32.tflite"
INT8_FILE = "model_int8.tflite"
CALIBRATION_IMAGES = 500  # representative training images for int8 calibration


def convert(model: Any, calibration: np.ndarray | None = None) -> bytes:
    """The model as a TFLite flatbuffer: float32, or full-integer int8 when ``calibration`` images are given."""
    from digits_ray.keras_api import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


def predict_proba(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    """Class probabilities (float) for uint8 (N, 28, 28) images, through the TFLite interpreter."""
    from digits_ray.keras_api import tf

    with warnings.catch_warnings():  # tf.lite.Interpreter announces its successor (ai-edge-litert)
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count())
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [len(images), *images.shape[1:]])
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images.astype(source["dtype"]))
    interpreter.invoke()
    out = interpreter.get_tensor(target["index"]).astype(np.float64)
    scale, zero_point = target["quantization"]
    return (out - zero_point) * scale if scale else out


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_tflite(model: Any, out_dir: Path, train_images: np.ndarray, test_images: np.ndarray,
                  test_labels: np.ndarray, keras_accuracy: float, seed: int = 0) -> dict[str, Any]:
    """Write both TFLite files into ``out_dir``; return their test accuracy, size and drop vs Keras."""
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = np.random.default_rng(seed).choice(len(train_images), min(CALIBRATION_IMAGES, len(train_images)),
                                                replace=False)
    report: dict[str, Any] = {"keras_test_accuracy": keras_accuracy, "calibration_images": len(picked)}
    for kind, file, calibration in (("float32", FLOAT32_FILE, None), ("int8", INT8_FILE, train_images[picked])):
        flatbuffer = convert(model, calibration)
        write_bytes_atomic(out_dir / file, flatbuffer)
        metrics = classification_metrics(predict_proba(flatbuffer, test_images), test_labels)
        report[kind] = {
            "file": file,
            "bytes": len(flatbuffer),
            "test_accuracy": metrics["accuracy"],
            "drop_vs_keras_points": round(100 * (keras_accuracy - metrics["accuracy"]), 4),
        }
    report["int8_size_ratio"] = report["float32"]["bytes"] / report["int8"]["bytes"]
    return report
