"""Experiments and benchmarks built on ``cfgzero_theory`` (run as ``python -m experiments.<name>``)."""
