"""Train a rewrite policy: `python train.py --models bert-base,resnext50 --latency cost --steps 20000 ...`
(the same as `xrlflow train`; see xrlflow/train.py)."""

import sys

from xrlflow.train import main

if __name__ == "__main__":
    sys.exit(main())
