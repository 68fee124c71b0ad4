"""The label-recovery benchmark: every method x model (trained and untrained) x batch size, plus a synthetic
1,000-class case; existence and count accuracy, time per recovery. Writes bench/results/labels.{csv,md,json,png}.
Usage: python bench/labels.py [--trials 10] [extra `gradinv bench labels` options]
"""

from __future__ import annotations

import sys

from _common import RESULTS
from gradinv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "labels", "--out", str(RESULTS), *sys.argv[1:]]))
