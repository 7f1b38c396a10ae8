"""Launching runs: sweep files expanded into points (sweep.py), run as local subprocesses (local.py),
and reported as a table and plots (report.py). A Slurm launcher reuses the same expansion."""
