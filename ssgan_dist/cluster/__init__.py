"""SLURM through submitit: the submitter (submit.py) and what each task runs (job.py). The
one-node SLURM the tests start lives with them (tests/slurm_local.py)."""
