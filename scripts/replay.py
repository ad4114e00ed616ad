"""`minilm-replay` from a checkout: see minilm/train/forensics.py (python scripts/replay.py --help)."""

import sys

from minilm.train.forensics import main

if __name__ == "__main__":
    sys.exit(main())
