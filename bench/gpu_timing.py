"""Moved to `xrlflow.paired_timing` (the transformer experiment times with it too); kept as a re-export."""

from xrlflow.paired_timing import *  # noqa: F401,F403
from xrlflow.paired_timing import __all__  # noqa: F401
