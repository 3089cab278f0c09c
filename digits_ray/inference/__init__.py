"""Inference: real images into MNIST's frame, the one ``Predictor`` (explanations, abstaining), batch
prediction, and the one test evaluation of a kept model."""
