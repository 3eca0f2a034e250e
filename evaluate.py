"""Optimise an ONNX model with a trained policy (or a search baseline): the same as `xrlflow optimize`.

    python evaluate.py MODEL.onnx [-o OUT.onnx] --policy [checkpoints/RUN] [--rollouts K] [--report R.json] ...
"""

import sys

from xrlflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["optimize", *sys.argv[1:]]))
