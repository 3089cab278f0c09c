"""The data contract every layer shares: image shape, classes, column names. No dependencies.

Models, the training feed, export and serving import these facts from here, never from the data
loader, so none of them pulls in file reading or downloading.
"""

IMAGE_SIZE = 28  # images are IMAGE_SIZE x IMAGE_SIZE uint8, white ink on black, as in MNIST
NUM_CLASSES = 10  # digits 0-9
IMAGE_COLUMN = "image"  # column names of the augmented Ray Data stream
LABEL_COLUMN = "label"
# What every digits-ray model reads; recorded in each artifact's metadata and checked by the predictor.
INPUT_CONTRACT = {"shape": [IMAGE_SIZE, IMAGE_SIZE], "dtype": "uint8", "layout": "white digit on black, MNIST frame"}
