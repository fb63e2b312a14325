"""run.json: a run folder's identity (run id, script, settings) and status (running, finished,
stopped, failed, with the step). No torch here: run_status.py reads it in a blink."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptkit.errors import UserError
from gptkit.files import write_json

RUN_FORMAT = "gpt-train-run/1"
RUN_FILE, LOCK_FILE = "run.json", "run.lock"
# What a run writes into its folder. A folder holding any of these but no run.json is another
# (older) run's and is refused; --overwrite moves these, and only these, aside.
RUN_OUTPUTS = (RUN_FILE, "train.log", "losses.json", "loss_plot.png", "tensorboard", "wandb")


def read_run_info(folder) -> dict | None:
    """run.json of a run folder, or None when there is none; a damaged one is refused."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or not info.get("run_id"):
        raise UserError(f"{path} is damaged or not written by this toolkit; move it away, or pick another --run_dir")
    return info


def status(state: str, step: int, reason: str = "") -> dict:
    return {"state": state, "step": step, "reason": reason, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_status(folder, state: str, step: int, reason: str = "") -> None:
    """Record how the run ended (or that it runs) in run.json: running, finished, stopped (by a signal
    or a lost launcher: resume it), failed."""
    info = read_run_info(folder)
    if info is not None:
        info["status"] = status(state, step, reason)
        write_json(Path(folder) / RUN_FILE, info)
