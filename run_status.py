"""What became of a training run, for a requeue script: one line, and an exit code to act on.

    python launch.py --nproc_per_node 8 pretraining_advanced.py --run_dir runs/gpt2 --resume auto
    python run_status.py runs/gpt2; case $? in 143|75) scontrol requeue "$SLURM_JOB_ID";; esac

Exit codes (the word run.json records):
    0    finished
    143  stopped: a SIGTERM or Ctrl-C saved a checkpoint, or its launcher died: resume it
    75   crashed: a process of the run died (a rank killed by the out-of-memory killer or a lost node,
         a gloo or NCCL abort): resume it from its newest checkpoint; after --max_crashes crashes in a
         row from the same checkpoint it says failed instead, so a requeue loop ends
    1    failed: a restart would repeat it (bad settings, non-finite losses, a full disk, a bug), or
         the run is still going in another process
    2    not a run folder
torchrun's own exit code cannot say this: it exits 1 whenever a worker failed or it was signalled,
whatever its workers did (launch.py passes these codes on instead).
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
from pathlib import Path

from gptkit.checkpoint.runinfo import lock_held, read_run_info, verdict
from gptkit.cli import run_cli
from gptkit.config import HelpFormatter
from gptkit.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run's folder (--run_dir of the training script)")
    p.add_argument("--max_crashes", type=int, default=3,
                   help="crashes in a row from the same checkpoint after which a crashed run counts as failed")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_crashes < 0:
        raise UserError(f"--max_crashes must be >= 0, got {args.max_crashes}")
    info = read_run_info(args.run_dir) if args.run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{args.run_dir} is not a run folder (no run.json)")
    code, line = verdict(info, lock_held(args.run_dir), args.max_crashes, args.run_dir)
    print(f"run {info['run_id']} in {args.run_dir}: {line}")
    return {"exit_code": code, "status": info.get("status"), "run_id": info["run_id"]}


if __name__ == "__main__":
    run_cli(main)
