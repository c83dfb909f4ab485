"""`python -m server ...` is the same as `chorus ...`."""

import sys

from server.cli import main

sys.exit(main())
