"""`python -m loadtests`: the load test gate (see loadtests/run.py)."""

import sys

from loadtests.run import main

sys.exit(main())
