"""How a script ends: `run_cli` runs its main() and turns the outcome into an exit code a scheduler
can act on, with one `error:` line (never a traceback) for anything the user or the machine did."""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable

from gptkit.errors import UserError
from gptkit.files import disk_full, full_disk_cause, os_reason

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_CRASHED = 75  # sysexits' EX_TEMPFAIL: a process of the run died or lost its peers; resume it
# What gloo and NCCL say when another process of the group is gone.
LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker",
                     "NCCL error", "NCCL communicator", "ProcessGroupNCCL", "ProcessGroupGloo", "Socket Timeout")
OOM_HINT = ("out of GPU memory: lower --batch_size (raise --grad_accum to keep the batch), use "
            "--activation_checkpointing, shorten --context_length, use --dtype bf16, or pick a smaller --model")


def quiet_interrupt_while_importing() -> None:
    """Ctrl-C while torch loads (seconds): a quiet exit 130, not a traceback. run_cli undoes it."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit(EXIT_SIGINT))


def _is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ()))


def lost_peer(e: BaseException) -> bool:
    """Whether `e` says that another process of a distributed run died or cannot be reached (the run
    crashed and can resume), as opposed to a failure a restart would repeat."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in LOST_PEER_MARKERS)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main() and exit with a code a scheduler can act on: 0 finished, 143 stopped by
    SIGTERM after saving a checkpoint (requeue it with --resume auto), 130 stopped by Ctrl-C, 75 another
    process of the run died (resume it), 2 bad input (one `error:` line), 1 any other failure (a full
    disk or out of memory: one line too)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the script's import-time handler is done
    try:
        result = main()
    except UserError as e:
        _fail(str(e), getattr(e, "exit_code", EXIT_BAD_INPUT))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            _fail(f"cannot write {e.filename or 'a file'}: {os_reason(e)}; check its permissions or pick another "
                  "folder", EXIT_BAD_INPUT)
        _fail_if_disk_full(e)
        raise
    except Exception as e:
        if _is_oom(e):
            _fail(OOM_HINT, EXIT_FAILED)
        if lost_peer(e):
            _fail(f"another process of this run died or lost its connection ({str(e).strip()[:160]}); "
                  "resume it with --resume auto", EXIT_CRASHED)
        _fail_if_disk_full(e)
        raise
    sys.exit(result.get("exit_code", EXIT_OK) if isinstance(result, dict) else EXIT_OK)


def _fail_if_disk_full(e: BaseException) -> None:
    full = full_disk_cause(e)
    if full is not None:
        _fail(str(disk_full(full.filename or getattr(e, "filename", None) or "a file", full)), EXIT_FAILED)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
