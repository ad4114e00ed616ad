"""`minilm-report` from a checkout: see minilm/analysis/report.py (python scripts/report.py --help)."""

import sys

from minilm.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
