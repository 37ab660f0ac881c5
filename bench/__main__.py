"""python -m bench: the whole comparison (bench/suite.py)."""

import sys

from bench.suite import main

sys.exit(main())
