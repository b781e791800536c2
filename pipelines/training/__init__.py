"""Training of the pancreas models on a Medical Segmentation Decathlon style folder."""
