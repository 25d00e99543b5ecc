"""`python -m acme`: the ACME client's loop (acme/client.py)."""

import sys

from acme.client import main

sys.exit(main())
