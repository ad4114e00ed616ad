"""`minilm-replay` from a checkout: see minilm/launch/replay.py (python scripts/replay.py --help)."""

import sys

from minilm.launch.replay import main

if __name__ == "__main__":
    sys.exit(main())
