"""One-off probes of the toy world (``python -m lab.probes.NAME`` from the repository root); their recorded
output is under ``lab/results/``."""
