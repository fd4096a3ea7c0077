#!/usr/bin/env python
"""Submit SSGAN training to SLURM: ``python cluster/submit.py --help``.

A thin entry point; the launcher is ``ssgan_dist.cluster.submit`` (importable by tests and
by the job processes, which need the installed package anyway).
"""

import sys

from ssgan_dist.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
