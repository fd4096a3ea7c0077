"""SLURM through submitit: the submitter (submit.py), what each task runs (job.py), and a
one-node SLURM on localhost for tests and trying it out (local.py)."""
