"""`minilm-report` from a checkout: see minilm/report.py (python scripts/report.py --help)."""

import sys

from minilm.report import main

if __name__ == "__main__":
    sys.exit(main())
