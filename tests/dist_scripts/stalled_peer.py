"""Rank 1 stalls before a collective; rank 0 must give up after dist.timeout_s, not hang.

    torchrun --nproc_per_node 2 tests/dist_scripts/stalled_peer.py key=value...

Rank 0 prints "gave up after <s> s" when its barrier fails, then exits 3.
"""

from __future__ import annotations

import os
import sys
import time

from ssgan_dist.config import load_config
from ssgan_dist.distributed.collectives import barrier
from ssgan_dist.distributed.env import setup


def main() -> int:
    cfg = load_config("demo", sys.argv[1:])
    env = setup(cfg.dist)
    if env.rank == 1:
        time.sleep(120)
        return 0
    start = time.monotonic()
    try:
        barrier()
    except Exception as exc:  # noqa: BLE001 (whatever the backend raises on a timeout)
        print(f"gave up after {time.monotonic() - start:.1f} s: {type(exc).__name__}", flush=True)
        os._exit(3)  # the peer is still asleep: do not wait for it in teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())
