"""Evaluating a pretrained encoder: reconstructions, the linear probe and kNN."""
