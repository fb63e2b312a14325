"""Run a training script on several processes, as torchrun does (it takes torchrun's own options), with
two differences a cluster user wants:

- the settings and inputs are checked once, in one process, before any worker starts (the script's
  --check): a refusal is one `error:` line, not one per rank under torchrun's traceback;
- the exit code is the run's own, read from its run.json: 0 finished, 143 stopped (resume it), 75
  crashed (resume it, a bounded number of times), 1 failed, 2 bad input. torchrun exits 1 whenever a
  worker failed or it was signalled, whatever its workers did.

    python launch.py --standalone --nproc_per_node 8 pretraining_advanced.py --model 124M --run_dir runs/gpt2
    python launch.py --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --nproc_per_node 8 pretraining_advanced.py ...            # each node, as with torchrun

Workers print their own lines (rank 0 the log, every rank an `error:` line if it fails); torchrun's
agent logs and its ChildFailedError traceback are left out, so a failure's reason is the last thing
on the screen.
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from gptkit.checkpoint.runinfo import read_run_info, verdict
from gptkit.cli import EXIT_BAD_INPUT, EXIT_FAILED, run_cli
from gptkit.errors import UserError


def check(script: str, script_args: list[str]) -> dict:
    """`python SCRIPT ARGS --check` in a process of its own: the run folder it would use, or its one
    error line (printed) and exit code."""
    r = subprocess.run([sys.executable, script, *script_args, "--check"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")})
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        print(error or f"error: {script} --check exited with {r.returncode}", file=sys.stderr)
        sys.exit(r.returncode)
    lines = r.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line)
    return json.loads(lines[-1])


def quiet_torchrun() -> None:
    """torchrun's agent logs every worker's end and a summary of failures: the workers say it better."""
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None) -> dict:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    targs = parse_args(argv if argv is not None else sys.argv[1:])
    if not Path(targs.training_script).is_file():
        raise UserError(f"{targs.training_script}: no such script")
    checked = check(targs.training_script, list(targs.training_script_args))
    quiet_torchrun()
    failure = signalled = None
    try:
        run(targs)
    except ChildFailedError as e:
        failure = e
    except SignalException as e:  # a scheduler's SIGTERM: torchrun passed it on and its workers saved and stopped
        signalled = 128 + int(e.sigval)
        print(f"launch.py: {signal.Signals(e.sigval).name} received and passed on to the workers", file=sys.stderr)
    info = read_run_info(checked["run_dir"]) if Path(checked["run_dir"]).is_dir() else None
    code = _exit_code(info, failure, checked["run_dir"]) if info is not None or signalled is None else signalled
    return {"exit_code": code, "run_dir": checked["run_dir"], "status": (info or {}).get("status")}


def _exit_code(info: dict | None, failure, run_dir: str) -> int:
    """The run's own code from its run.json (run_status.py's verdict); without one, 2 if every worker
    refused its input, else 1."""
    if info is not None:
        return verdict(info, running_now=False, folder=run_dir)[0]
    if failure is None:
        return 0
    codes = {f.exitcode for f in failure.failures.values()}
    return EXIT_BAD_INPUT if codes == {EXIT_BAD_INPUT} else EXIT_FAILED


if __name__ == "__main__":
    run_cli(main)
