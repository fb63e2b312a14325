"""Kept so that `import checkpointing` goes on working: run state on disk lives in gptkit/checkpoint/
(state.py: what a checkpoint holds; store.py: the files; folder.py: the run folder and its index)
and gptkit/files.py (atomic writes and the folder lock)."""

# ruff: noqa: F401, F403
from gptkit.checkpoint.folder import *
from gptkit.checkpoint.state import *
from gptkit.checkpoint.store import *
from gptkit.errors import CheckpointError, RunFailure, UserError
from gptkit.files import FolderLock, atomic_write, remove_stale_temps, sha256_file, write_json
