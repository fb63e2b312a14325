"""Run a repository script as `python SCRIPT ARGS...` would, with the fault plan in $FAULT_PLAN armed
first (tests/faults.py says what a plan can do). Used under torchrun too: every worker arms it."""

import json
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import faults  # noqa: E402

script, *args = sys.argv[1:]
faults.arm(json.loads(os.environ.get("FAULT_PLAN") or "{}"))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
