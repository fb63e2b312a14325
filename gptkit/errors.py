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


def excerpt(value, limit: int = 60) -> str:
    """A value as an error line shows it: its repr, cut to `limit` characters (a bad value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
