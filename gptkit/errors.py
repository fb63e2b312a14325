"""The toolkit's errors: each is shown as one `error:` line, never a traceback (gptkit.cli.run_cli)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment: one line, exit code 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, damaged, crafted, or of another model or run."""


class RunFailure(UserError):
    """Not bad input but the environment failing mid-run (a full disk...): one line, exit code 1."""

    exit_code = 1
