"""Benchmarks (`mae bench ...`) and the one-shot GPU check. Each measures side by
side in one run and reports ratios; none is imported by training code."""
