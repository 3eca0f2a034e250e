"""The policies shipped with xrlflow, installed as package data `xrlflow.checkpoints` (found by xrlflow.shipped).

Only the runs named in pyproject.toml's package-data are packaged; runs that training writes here are not."""
