"""digits-ray: MNIST from raw IDX files to a tuned model behind a Ray Serve endpoint.

Rooms, in the order data flows: ``data`` -> ``models`` -> ``train`` and ``inference`` -> ``tune`` ->
``serve``; each imports only rooms before it (train and inference not each other), and the shared modules
beside them (config, errors, schema, keras_api, plots) import no room. ``tests/test_layout.py`` checks it.
"""

import os

# Keras 3's Model.fit does not work under tf.distribute.MultiWorkerMirroredStrategy
# (keras-team/keras#20585), which Ray Train's TensorflowTrainer uses, so the whole project
# trains with tf-keras (Keras 2). This must be set before TensorFlow is first imported, so
# that ``tf.keras`` inside TensorFlow and Ray resolves to the same Keras as ours.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ INFO and WARNING lines out of logs

__version__ = "0.1.0"
