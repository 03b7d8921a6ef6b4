"""Launchers: local processes (local.py), SLURM (slurm/), GKE JobSet (gke/). See README.md."""
