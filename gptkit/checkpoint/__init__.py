"""Run state on disk, in three layers: `state` (what a checkpoint holds, part by part), `store` (the
files: whole or sharded, checksummed, read as data only) and `folder` (the folder a run owns, and the
one index of its checkpoints)."""
