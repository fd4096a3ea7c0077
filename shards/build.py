"""Build or verify webdataset shards; see shards/README.md. The logic is in
ssgan_dist/data/build_cli.py; this wrapper also runs from a checkout without installing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssgan_dist.data.build_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
