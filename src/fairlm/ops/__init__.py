"""Compute kernels kept apart from the modules that use them (as in mamba-ssm)."""
