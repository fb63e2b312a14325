"""The folder one run owns. `run.json` names the run (an id and the settings that define it) and its
status, `run.lock` keeps a second live process out, and `CheckpointIndex` is the one place that names,
lists, orders and prunes checkpoints: only this run's, by the step recorded inside them. Nothing the
toolkit did not write is deleted or overwritten; a run started over (`--overwrite`) moves the old
files aside instead, and so does a save that finds another run's file at its name."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptkit.checkpoint.runinfo import (
    LOCK_FILE,
    RUN_FILE,
    RUN_FORMAT,
    RUN_OUTPUTS,
    RUN_RECORDS,
    UNANNOUNCED,
    read_run_info,
    status,
    with_status,
    write_status,
)
from gptkit.checkpoint.store import SHARDED_DONE, checkpoint_header, load_checkpoint, save_checkpoint, save_sharded
from gptkit.errors import CheckpointError, UserError
from gptkit.files import FolderLock, make_folder, remove_stale_temps, write_json
from gptkit.plugins import check_same_plugins


class CheckpointIndex:
    """The checkpoints in a folder: `ckpt_NNNNNNNN.pt` files and `ckpt_NNNNNNNN` folders (sharded), and
    the temp names their writers use. Every checkpoint name in the toolkit is made or read here."""

    NAME_RE = re.compile(r"^ckpt_(\d{8})(?:\.pt)?$")
    SHARDED_TEMP_RE = re.compile(r"^\.(ckpt_\d{8})\.(tmp|old)$")  # a sharded checkpoint being written or replaced

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @staticmethod
    def name(step: int, sharded: bool = False) -> str:
        return f"ckpt_{step:08d}" if sharded else f"ckpt_{step:08d}.pt"

    def path(self, step: int, sharded: bool = False) -> Path:
        return self.dir / self.name(step, sharded)

    @classmethod
    def is_checkpoint(cls, name: str) -> bool:
        return bool(cls.NAME_RE.match(name))

    def at_step(self, step: int) -> list[Path]:
        """What exists under either name of this step."""
        return [p for p in (self.path(step), self.path(step, sharded=True)) if p.exists()]

    def entries(self, run_id: str | None = None, include_unreadable: bool = False) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints here, oldest first by the step recorded inside, of run
        `run_id` only when given (a file without a run id is nobody's). Files whose header cannot be
        read are left out (and left alone) unless `include_unreadable` (then ordered by their name)."""
        found = []
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            m = self.NAME_RE.match(p.name)
            if not m:
                continue
            try:
                head = checkpoint_header(p)
            except CheckpointError:
                if include_unreadable:  # in this run's folder, so presumably its own: resume names it as damaged
                    found.append((int(m.group(1)), 0.0, p))
                continue
            if run_id is None or head.get("run_id") == run_id:
                found.append((int(head["step"]), float(head.get("saved_at") or 0), p))
        return [(s, p) for s, _, p in sorted(found)]

    def steps(self, run_id: str | None = None) -> list[int]:
        return [s for s, _ in self.entries(run_id)]

    def owner(self, path: Path) -> str | None:
        """The run id recorded in a checkpoint, or None (none recorded, or unreadable)."""
        try:
            return checkpoint_header(path).get("run_id")
        except CheckpointError:
            return None

    def remove_stale_temps(self, log: Callable[[str], None]) -> None:
        """Temp files and folders a killed writer left: a sealed sharded folder (complete.json is written
        last) whose final name is free takes that name; the rest of the checkpoint temps are removed."""
        for p in remove_stale_temps(self.dir, lambda n: self.is_checkpoint(n) or n in RUN_OUTPUTS):
            log(f"removed {p.name}, a temp file left by a killed run")
        for p in sorted(self.dir.iterdir(), key=lambda p: (not p.name.endswith(".tmp"), p.name)):  # new before old
            m = self.SHARDED_TEMP_RE.match(p.name)
            if not (m and p.is_dir()):
                continue
            final = self.dir / m[1]
            if not final.exists() and (p / SHARDED_DONE).is_file():
                os.replace(p, final)
                log(f"completed {final.name} from {p.name}, left by a killed run")
            else:
                shutil.rmtree(p)
                log(f"removed {p.name}, an unfinished checkpoint folder left by a killed run")

    def prune(self, run_id: str, keep_last: int, keep: Path) -> list[Path]:
        """Keep run `run_id`'s `keep_last` newest checkpoints by recorded step, `keep` (the one just
        written) always among them; other runs' files and unreadable ones are not touched."""
        if keep_last <= 0:
            return []
        mine = [p for _, p in self.entries(run_id) if p != keep]
        doomed = mine[: max(0, len(mine) - (keep_last - 1))]
        for p in doomed:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return doomed


@dataclass
class ResumePoint:
    path: Path
    checkpoint: dict  # loaded and verified


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]  # also the W&B run id: 8 characters of [a-z0-9], as W&B makes them


class RunFolder:
    """The folder one run owns. `claim()` (main rank only) locks it, checks it holds no other run,
    resolves --resume once and records the run's identity in run.json."""

    def __init__(self, directory, keep_last: int = 3, log: Callable[[str], None] = print):
        self.dir, self.keep_last, self.log = Path(directory), keep_last, log
        self.index = CheckpointIndex(self.dir)
        self.lock = FolderLock(self.dir / LOCK_FILE, what="run")
        self.run_id: str | None = None
        self.resume_point: ResumePoint | None = None
        self.dry = False  # preview(): decide as claim() would, but move, rename and write nothing
        self.started = False  # set once training begins; before that a refusal undoes the claim
        self._run_json_before: bytes | None = None

    # -- claiming -----------------------------------------------------------------------------

    def claim(self, script: str, settings: dict, resume: str | None = None, overwrite: bool = False,
              checkpoint_bytes: int = 0, plugins=(), accept: Callable[[dict], None] | None = None) -> RunFolder:
        make_folder(self.dir, "run folder", "pick another folder with --run_dir")
        self.lock.acquire()
        try:
            self._claim_locked(script, settings, resume, overwrite, checkpoint_bytes, list(plugins), accept)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _claim_locked(self, script, settings, resume, overwrite, checkpoint_bytes, plugins, accept) -> None:
        self.index.remove_stale_temps(self.log)
        info = self.read_info()
        if resume:
            self.resume_point = self._resolve_resume(resume, info, overwrite, plugins, accept)
        earlier = info if resume else None  # a requeued run goes on counting its crashes
        if self.resume_point is None:
            info = self._clear_for_new_run(info, overwrite)
        self.run_id = self._run_id(info)
        self._check_space(checkpoint_bytes)
        step = self.resume_point.checkpoint["step"] if self.resume_point else 0
        record = {"format": RUN_FORMAT, "run_id": self.run_id, "script": script, "settings": settings,
                  "created": (info or {}).get("created", time.strftime("%Y-%m-%d %H:%M:%S")),
                  "plugins": [p.record() for p in plugins], "crashes": self._crashes_so_far(earlier, step),
                  "status": status("running", step)}
        path = self.dir / RUN_FILE
        self._run_json_before = path.read_bytes() if path.is_file() else None
        try:
            write_json(path, record)  # also the probe that the folder is writable
        except (OSError, UserError) as e:
            raise UserError(f"cannot write to run folder {self.dir} ({getattr(e, 'strerror', None) or e}); pick "
                            "another --run_dir")

    def preview(self, resume: str | None = None, overwrite: bool = False, plugins=()) -> ResumePoint | None:
        """What claim() would decide, read-only (the scripts' --check): the checkpoint it would resume
        from (loaded and verified), or the one error line it would refuse with. Nothing is moved,
        renamed or written."""
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.dir} is a file; pick another folder with --run_dir")
        self.dry = True
        try:
            info = self.read_info() if self.dir.is_dir() else None
            point = self._resolve_resume(resume, info, overwrite, list(plugins)) if resume else None
            if point is None and self.dir.is_dir():
                self._clear_for_new_run(info, overwrite)
            return point
        finally:
            self.dry = False

    def _crashes_so_far(self, info: dict | None, step: int) -> list:
        """The crashes this run has had (resumed, or restarted from scratch by --resume auto before its
        first checkpoint); a previous process that still says "running" (we hold the lock now, so it is
        gone) was killed before it could say so: one more crash, from this checkpoint."""
        if not info or (info.get("run_id") != self.run_id and self.resume_point is not None):
            return []
        s = info.get("status") or {}
        if s.get("state") == "running":
            info = with_status(info, "crashed", s.get("step", 0), UNANNOUNCED, step if self.resume_point else None)
        return info.get("crashes") or []

    def _clear_for_new_run(self, info: dict | None, overwrite: bool) -> None:
        """A new run needs a folder without another run's checkpoints (refused unless --overwrite);
        the logs of a run that never saved a checkpoint are moved aside, so they do not mix."""
        if any(self.index.is_checkpoint(p.name) for p in self.dir.iterdir()) and not overwrite:
            raise UserError(self._taken_message(info))
        if self._run_outputs():
            self.move_aside(info)
        return None

    def _run_id(self, info: dict | None) -> str:
        if self.resume_point is not None and self.resume_point.checkpoint.get("run_id"):
            return self.resume_point.checkpoint["run_id"]
        return (info or {}).get("run_id") or new_run_id()

    def _taken_message(self, info: dict | None) -> str:
        steps = sorted(self.index.steps())
        what = f"run {info['run_id']}" if info else "files of an earlier run"
        at = f" (checkpoints up to step {steps[-1]})" if steps else ""
        return (f"{self.dir} already holds {what}{at}; continue it with --resume auto, start this run in a new "
                "--run_dir, or add --overwrite to move its files aside")

    def _run_outputs(self) -> list[Path]:
        return [p for p in self.dir.iterdir() if p.name in RUN_OUTPUTS or self.index.is_checkpoint(p.name)]

    def read_info(self) -> dict | None:
        return read_run_info(self.dir)

    def _check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.dir).free
        if nbytes and free < 1.1 * nbytes:
            raise UserError(f"only {free / 2**30:.2f} GiB free in {self.dir}, a checkpoint of this run needs about "
                            f"{nbytes / 2**30:.2f} GiB; free some space or pick another --run_dir")

    # -- status: what a requeue script reads ----------------------------------------------------

    def set_status(self, state: str, step: int, reason: str = "", checkpoint_step: int | None = None) -> None:
        """How the run ended, in run.json (rank 0): finished, stopped or crashed (resume it), failed."""
        write_status(self.dir, state, step, reason, checkpoint_step)

    # -- resuming -----------------------------------------------------------------------------

    def _resolve_resume(self, resume: str, info: dict | None, overwrite: bool, plugins=(), accept=None) -> ResumePoint | None:
        point = self._latest_valid(info) if resume == "auto" else ResumePoint(Path(resume), load_checkpoint(resume))
        if point is not None:  # the plugins it was trained with, given again and unchanged; the model's parts
            check_same_plugins((point.checkpoint.get("run") or {}).get("plugins"), plugins, f"checkpoint {point.path}")
            if accept is not None:
                accept(point.checkpoint)
        if point is None:
            if not self.dry:
                self.log(f"no checkpoint in {self.dir} yet: starting from scratch")
            return None
        own = info["run_id"] if info else point.checkpoint.get("run_id")
        if info and point.checkpoint.get("run_id") not in (info["run_id"], None) and self.index.steps(own):
            return self._resume_another_run(point, info, overwrite)
        self._newer_aside(point, own, info, overwrite)
        return point

    def _newer_aside(self, point: ResumePoint, own: str | None, info: dict | None, overwrite: bool) -> None:
        """Resuming from an older checkpoint of this run: its newer ones would be overwritten as training
        passes their steps again, so they are refused, or with --overwrite moved aside."""
        newer = [(s, p) for s, p in self.index.entries(own) if s > point.checkpoint["step"]]
        if not newer:
            return
        if not overwrite:
            raise UserError(f"{self.dir} holds newer checkpoints of this run (step "
                            f"{', '.join(str(s) for s, _ in newer)}) that resuming from step {point.checkpoint['step']} "
                            "would overwrite; resume with --resume auto, or add --overwrite to move the newer ones aside")
        self.move_aside(info, only=[p for _, p in newer], copy_records=True)

    def _resume_another_run(self, point: ResumePoint, info: dict, overwrite: bool) -> ResumePoint:
        """A checkpoint of another run resumed in a folder holding this one's: refused, or with
        --overwrite the folder's run moved aside."""
        if not overwrite:
            raise UserError(f"{point.path} belongs to run {point.checkpoint.get('run_id')}, {self.dir} to run "
                            f"{info['run_id']}; resume it in its own folder, or add --overwrite to move this "
                            "folder's files aside")
        self.move_aside(info)
        return point

    def _latest_valid(self, info: dict | None) -> ResumePoint | None:
        """The newest checkpoint of this folder's run that loads and matches its checksum. Damaged
        newer ones are named and, since training will pass their step again, renamed to *.damaged
        (kept, never deleted); when none loads, nothing is touched and the run stops."""
        own = info["run_id"] if info else None
        candidates = self.index.entries(own, include_unreadable=True)
        damaged = []
        for _, path in reversed(candidates):
            try:
                point = ResumePoint(path, load_checkpoint(path))
            except CheckpointError as e:
                damaged.append((path, str(e)))
                continue
            for bad, why in damaged if not self.dry else ():
                os.replace(bad, bad.with_name(bad.name + ".damaged"))
                self.log(f"warning: skipping {why}; kept it as {bad.name}.damaged")
            return point
        if damaged:
            raise CheckpointError(f"no checkpoint in {self.dir} can be loaded ({len(damaged)} damaged; the newest: "
                                  f"{damaged[0][1]}); start a new --run_dir, or start over here with --overwrite "
                                  "instead of --resume")
        return None

    # -- saving ---------------------------------------------------------------------------------

    def save(self, checkpoint: dict) -> Path:
        """Write this run's checkpoint, then (once it is durable) prune this run's older ones."""
        path = self.index.path(checkpoint["step"])
        self._make_way(checkpoint["step"])
        path = save_checkpoint(path, checkpoint)
        self.index.prune(self.run_id, self.keep_last, keep=path)
        return path

    def save_sharded(self, checkpoint: dict, rank: int) -> Path:
        """The same for a sharded checkpoint (a folder); every rank calls it, rank 0 prunes."""
        if rank == 0:
            self._make_way(checkpoint["step"])
        path = save_sharded(self.index.path(checkpoint["step"], sharded=True), checkpoint, rank)
        if rank == 0:
            self.index.prune(self.run_id, self.keep_last, keep=path)
        return path

    def _make_way(self, step: int) -> None:
        """A file or folder under this step's names that is not this run's (another run's, a weights
        file put there by hand, an unreadable one) is moved aside, never written over."""
        strangers = [p for p in self.index.at_step(step) if self.index.owner(p) != self.run_id]
        if strangers:
            self.move_aside(None, only=strangers, label="not-this-run")

    # -- moving aside ---------------------------------------------------------------------------

    def move_aside(self, info: dict | None, only: list[Path] | None = None, label: str | None = None,
                   copy_records: bool = False) -> Path | None:
        """Move a previous run's files (or `only` these) into a new folder previous/<run>-<time>[-N]/;
        nothing is deleted or written over. With `copy_records` the run's records (run.json, train.log,
        losses.json, the plot, TensorBoard and W&B files) are copied there too: the run goes on writing
        them, and the steps it abandons stay on record beside their checkpoints."""
        if self.dry:
            return None
        label = label or (info or {}).get("run_id") or "earlier"
        base = self.dir / "previous" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest, n = base, 1
        while dest.exists():
            n += 1
            dest = base.with_name(f"{base.name}-{n}")
        dest.mkdir(parents=True)
        for p in only if only is not None else self._run_outputs():
            os.replace(p, dest / p.name)
        for name in RUN_RECORDS if copy_records else ():
            src = self.dir / name
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, dest / name, symlinks=True)
            elif src.is_file() and not src.is_symlink():
                shutil.copy2(src, dest / name)
        what = ", ".join(p.name for p in only) if only is not None else "the earlier run"
        self.log(f"moved {what} aside to {dest}" + (" (with a copy of the run's records)" if copy_records else ""))
        return dest

    def keep_tokenizer(self, tok) -> Path | None:
        """A copy of the run's tokenizer in tokenizer/ (rank 0; not GPT-2's, which every install has), so
        the folder says what its ids mean; checkpoints carry it too. Written once, atomically."""
        folder = self.dir / "tokenizer"
        if tok.name == "gpt2" and not tok.files.get("tokenizer.json") or folder.exists():
            return None
        from gptkit.files import atomic_write

        folder.mkdir()
        for name, text in tok.files.items():
            atomic_write(folder / name, lambda f, t=text: f.write(t.encode("utf-8")))
        return folder

    def undo_claim(self) -> None:
        """A run refused before its first step (rank 0): run.json back as it was before claim(), so a
        finished run stays finished and a requeue script is not told to resume a bad-input run. The
        sinks (gptkit/sinks.py Deferred) wrote nothing yet; the lock is released by release()."""
        if self.started or self.run_id is None or self.lock.fd is None:
            return
        path = self.dir / RUN_FILE
        if self._run_json_before is None:
            path.unlink(missing_ok=True)
        else:
            from gptkit.files import atomic_write

            before = self._run_json_before
            atomic_write(path, lambda f: f.write(before))

    def release(self) -> None:
        self.lock.release()
