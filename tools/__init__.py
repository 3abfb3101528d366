"""Measurement and maintenance scripts (not part of the installed package): run them from the
repository root as ``python -m tools.NAME --help``. Shell tools: gpu_check.sh, old_versions.sh."""
