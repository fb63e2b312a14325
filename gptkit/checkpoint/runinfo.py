"""run.json: a run folder's identity (run id, script, settings, plugins) and status, with the step:

    running   a process holds the run (or one was killed before it could say: see crashed)
    finished  it reached its last step
    stopped   a SIGTERM, Ctrl-C or a lost launcher stopped it after saving: resume it
    crashed   a process of the run died or lost its peers (a rank killed, a gloo/NCCL abort): resume it
              from its newest checkpoint, a bounded number of times
    failed    something a restart would repeat (bad settings, non-finite losses, a full disk, a bug)

`crashes` lists the crashes since the run last ended otherwise, each with the checkpoint step it could
resume from, so a requeue script can stop after N crashes without progress. No torch here:
run_status.py reads it in a blink."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path

from gptkit.cli import EXIT_CRASHED, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM
from gptkit.errors import UserError
from gptkit.files import write_json

RUN_FORMAT = "gpt-train-run/1"
RUN_FILE, LOCK_FILE = "run.json", "run.lock"
# What a run writes into its folder. A folder holding any of these but no run.json is another
# (older) run's and is refused; --overwrite moves these, and only these, aside.
RUN_OUTPUTS = (RUN_FILE, "train.log", "losses.json", "loss_plot.png", "tensorboard", "wandb", "tokenizer")
# Of those, the records of a run's steps: kept (copied aside) when --overwrite resumes behind newer checkpoints.
RUN_RECORDS = (RUN_FILE, "train.log", "losses.json", "loss_plot.png", "tensorboard", "wandb")
STATES = ("running", "finished", "stopped", "crashed", "failed")
CHECKPOINT_NAME = re.compile(r"^ckpt_\d{8}(?:\.pt)?$")  # as gptkit.checkpoint.folder.CheckpointIndex names them
UNANNOUNCED = "ended without a word (a process killed, e.g. by the out-of-memory killer or a lost node)"


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


def with_status(info: dict, state: str, step: int, reason: str = "", checkpoint_step: int | None = None) -> dict:
    """`info` with a new status; a crash joins the list of crashes (with the checkpoint it can resume
    from), any other end clears it."""
    crashes = list(info.get("crashes") or [])
    if state == "crashed":
        crashes.append({"step": step, "checkpoint": checkpoint_step, "reason": reason[:300],
                        "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    elif state != "running":
        crashes = []
    return {**info, "status": status(state, step, reason), "crashes": crashes}


def write_status(folder, state: str, step: int, reason: str = "", checkpoint_step: int | None = None) -> None:
    """Record how the run ended (or that it runs) in run.json."""
    info = read_run_info(folder)
    if info is not None:
        write_json(Path(folder) / RUN_FILE, with_status(info, state, step, reason, checkpoint_step))


def crashes_without_progress(crashes: list[dict]) -> int:
    """How many of the latest crashes in a row could resume from the same checkpoint (no progress)."""
    if not crashes:
        return 0
    last, n = crashes[-1].get("checkpoint"), 0
    for c in reversed(crashes):
        if c.get("checkpoint") != last:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# What a requeue script reads (run_status.py, launch.py)


def lock_held(folder: Path) -> bool:
    """Whether a live process holds the run's lock now."""
    path = folder / LOCK_FILE
    if not path.exists():
        return False
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def newest_checkpoint_step(folder) -> int | None:
    """The highest step among the checkpoint names in a run folder (None when there are none)."""
    steps = [int(p.name[5:13]) for p in Path(folder).glob("ckpt_*") if CHECKPOINT_NAME.match(p.name)] if folder else []
    return max(steps, default=None)


def verdict(info: dict, running_now: bool, max_crashes: int = 3, folder=None) -> tuple[int, str]:
    s = info.get("status") or {"state": "running", "step": 0}
    step, reason = s.get("step", 0), s.get("reason") or ""
    if s["state"] == "running" and running_now:
        return EXIT_FAILED, f"still running (since {s.get('since', '?')})"
    if s["state"] == "running":  # nobody holds it: its process was killed before it could say so
        info = with_status(info, "crashed", step, UNANNOUNCED, newest_checkpoint_step(folder))
        s, reason = {"state": "crashed"}, UNANNOUNCED
    if s["state"] == "finished":
        return EXIT_OK, f"finished at step {step}"
    if s["state"] == "stopped":
        return EXIT_SIGTERM, f"stopped at step {step} ({reason or 'a signal'}): resume it with --resume auto"
    if s["state"] == "crashed":
        return _crashed(info, step, reason, max_crashes)
    return EXIT_FAILED, f"failed at step {step}: {reason}"


def _crashed(info: dict, step: int, reason: str, max_crashes: int) -> tuple[int, str]:
    n = crashes_without_progress(info.get("crashes") or [])
    ckpt = (info.get("crashes") or [{}])[-1].get("checkpoint")
    at = f"the checkpoint of step {ckpt}" if ckpt is not None else "the start (no checkpoint yet)"
    if n > max_crashes:
        return EXIT_FAILED, (f"crashed {n} times in a row from {at} without progress (last at step {step}: "
                             f"{reason}); not resuming: find the cause in its log")
    return EXIT_CRASHED, (f"crashed at step {step} ({reason}): resume it with --resume auto from {at} (crash {n} "
                          f"in a row without progress; at most {max_crashes})")
