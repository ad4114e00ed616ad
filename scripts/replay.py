"""`minilm-replay` from a checkout: see minilm/forensics.py (python scripts/replay.py --help)."""

import sys

from minilm.forensics import main

if __name__ == "__main__":
    sys.exit(main())
