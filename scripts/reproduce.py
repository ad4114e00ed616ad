"""`minilm-reproduce` from a checkout: see minilm/launch/reproduce.py (python scripts/reproduce.py --help)."""

import sys

from minilm.launch.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
