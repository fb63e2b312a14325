"""What became of a training run, for a requeue script: one line, and an exit code to act on.

    torchrun ... pretraining_advanced.py --run_dir runs/gpt2 --resume auto
    python run_status.py runs/gpt2; [ $? -eq 143 ] && scontrol requeue "$SLURM_JOB_ID"

Exit codes: 0 finished; 143 stopped early and resumable (a SIGTERM or Ctrl-C saved a checkpoint, its
launcher died, or the process was killed without a word: continue it with --resume auto); 1 failed
(or still running in another process); 2 not a run folder. torchrun's own exit code cannot say this:
it exits 1 whenever it was signalled, whatever its workers did.
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import contextlib
import fcntl
import os
from pathlib import Path

from gptkit.checkpoint.runinfo import LOCK_FILE, read_run_info
from gptkit.cli import EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, run_cli
from gptkit.config import HelpFormatter
from gptkit.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run's folder (--run_dir of the training script)")
    return p


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


def verdict(info: dict, running_now: bool) -> tuple[int, str]:
    s = info.get("status") or {"state": "running", "step": 0}
    step, reason = s.get("step", 0), s.get("reason") or ""
    if s["state"] == "finished":
        return EXIT_OK, f"finished at step {step}"
    if s["state"] == "stopped":
        return EXIT_SIGTERM, f"stopped at step {step} ({reason or 'a signal'}): resume it with --resume auto"
    if s["state"] == "failed":
        return EXIT_FAILED, f"failed at step {step}: {reason}"
    if running_now:
        return EXIT_FAILED, f"still running (since {s.get('since', '?')})"
    return EXIT_SIGTERM, (f"ended without a word after starting at step {step} (killed?): resume it with --resume auto "
                          "from its newest checkpoint")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    info = read_run_info(args.run_dir) if args.run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{args.run_dir} is not a run folder (no run.json)")
    code, line = verdict(info, lock_held(args.run_dir))
    print(f"run {info['run_id']} in {args.run_dir}: {line}")
    return {"exit_code": code, "status": info.get("status"), "run_id": info["run_id"]}


if __name__ == "__main__":
    run_cli(main)
