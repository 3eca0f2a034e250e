"""`python -m xrlflow ...` is the `xrlflow` command."""

import sys

from xrlflow.cli import main

sys.exit(main())
