"""Datasets as shards: the manifest (what a dataset is), the tar format, listing
image sources, the validating writer, and the FFCV ``.beton`` variant."""
