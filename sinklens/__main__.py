"""``python -m sinklens``: the command line of the notebook series (:mod:`sinklens.series.cli`)."""

import sys

from .series.cli import main

if __name__ == "__main__":
    sys.exit(main())
