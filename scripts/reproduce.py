"""`minilm-reproduce` from a checkout: see minilm/reproduce.py (python scripts/reproduce.py --help)."""

import sys

from minilm.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
