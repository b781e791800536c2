"""Evaluation of the pancreas pipelines on a labelled folder (PANORAMA metrics)."""
