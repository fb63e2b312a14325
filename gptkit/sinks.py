"""Where a run's numbers go (rank 0): train.log (always), Weights & Biases and TensorBoard (when
asked), each called as sink(kind, metrics) with kind "train", "eval" or "histograms", under one naming
(train/loss, eval/val_loss, ...). Each step is recorded once, across a kill and a resume."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptkit.checkpoint.folder import RunFolder
from gptkit.config import at_least, setting
from gptkit.errors import UserError
from gptkit.files import atomic_write
from gptkit.metrics import format_log_line

VERSIONED_PACKAGES = ("torch", "numpy", "tiktoken", "datasets", "wandb", "galore-torch", "tensorboard", "transformers")


@dataclass
class SinkConfig:
    wandb: bool = setting(False, "log to Weights & Biases (offline without an API key)")
    wandb_project: str = setting("gpt-pretraining", "W&B project")
    wandb_run_name: str | None = setting(None, "W&B run name (default: the run folder's name)")
    tensorboard: bool = setting(False, "write TensorBoard event files")
    histogram_every: int = setting(0, "parameter and gradient histograms to W&B and TensorBoard every N steps (0: never)",
                                   check=(at_least(0), ">= 0"))


def git_hash() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class FileLog:
    """train.log in the run folder: a header with config, versions and git hash, then every log line.
    A resumed run first drops the lines of steps after its checkpoint (a killed process logged them,
    the resumed one logs them again), so each step is in the file once."""

    STEP_RE = re.compile(r"^(?:eval |val )?step\s+(\d+)")

    def __init__(self, path: Path, header: dict, resumed_at: int | None = None):
        if resumed_at is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines(keepends=True) if not self._after(ln, resumed_at)]
            atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.f = open(path, "a", buffering=1)
        what = f"resumed at step {resumed_at}" if resumed_at is not None else "started"
        self.f.write(f"# run {what} {time.strftime('%Y-%m-%d %H:%M:%S')}\n# {json.dumps(header, sort_keys=True)}\n")

    @classmethod
    def _after(cls, line: str, step: int) -> bool:
        m = cls.STEP_RE.match(line)
        return bool(m) and int(m.group(1)) > step

    def __call__(self, kind: str, metrics: dict) -> None:
        if kind == "train":
            self.f.write(format_log_line(metrics) + "\n")
        elif kind in ("eval", "val"):
            self.f.write(f"{kind} step {metrics['step']} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k != "step") + "\n")

    def close(self):
        self.f.close()


def wandb_records(data: bytes):
    """The protobuf payloads of a .wandb file: a LevelDB-style log after a 7-byte header, in 32 KiB
    blocks of records (length, type) where a record that does not fit a block is split into first,
    middle and last fragments. A torn record at the end of a killed process's file is dropped."""
    import struct

    pos, pending, block = 7, None, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if len(payload) < length:
            return
        if kind == 1:  # full
            yield payload
        elif kind == 2:  # first
            pending = payload
        elif kind == 3 and pending is not None:  # middle
            pending += payload
        elif kind == 4 and pending is not None:  # last
            yield pending + payload
            pending = None


def wandb_logged_through(run: RunFolder) -> int | None:
    """The last step that earlier processes of this run saved in their local W&B files (offline-run-*
    and run-* folders keep every record sent); None when they hold none (step 0 not logged either)."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        return None
    last = None
    for path in (run.dir / "wandb").glob(f"*-{run.run_id}/*.wandb"):
        for payload in wandb_records(path.read_bytes()):
            record = pb.Record()
            if _parses(record, payload) and record.WhichOneof("record_type") == "history":
                last = max(last if last is not None else -1, record.history.step.num)
    return last


def _parses(record, payload: bytes) -> bool:
    try:
        record.ParseFromString(payload)
        return True
    except Exception:  # a torn record at the end of a killed process's file
        return False


def metric_items(kind: str, metrics: dict):
    """The metrics charted in W&B and TensorBoard, under one naming: train/loss, eval/val_loss, ..."""
    for k, v in metrics.items():
        if k not in ("step", "max_steps") and isinstance(v, (int, float)) and v is not None:
            yield f"{kind}/{k}", v


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


def wandb_config(header: dict) -> dict:
    """The run's settings flat, under the flags' names (lr, batch_size, ...: what W&B's run table,
    filters and sweeps use), and the rest of the header (model config, versions, git) under run_info."""
    return {**(header.get("args") or {}), "run_info": {k: v for k, v in header.items() if k != "args"}}


def start_wandb(cfg: SinkConfig, run: RunFolder, config: dict):
    """The W&B run with the run folder's id, resumed if it exists. Steps that an earlier process of
    this run already saved to W&B are not logged again (the resumed run recomputes them bit for bit):
    each step is logged once, so offline runs synced later do not clash. Steps a killed process had
    not yet handed to W&B's files are logged by the resumed run."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install -r requirements.txt")
    already = wandb_logged_through(run)
    wb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or run.dir.name, id=run.run_id,
                    resume="allow", dir=str(run.dir), config=wandb_config(config), mode=wandb_mode())

    def sink(kind: str, metrics: dict) -> None:
        if already is not None and metrics["step"] <= already:
            return
        if kind == "histograms":
            values = {k: wandb.Histogram(v.numpy()) for k, v in metrics.items() if k != "step"}
        else:
            values = dict(metric_items(kind, metrics))
        wb.log(values, step=metrics["step"])
    return wb, sink


def start_tensorboard(run: RunFolder, start_step: int | None):
    """A SummaryWriter in run/tensorboard. A resumed run first rewrites the event files of earlier
    processes without the steps after its checkpoint, so each step is in the files once (TensorBoard's
    purge marker only hides them from its own reader)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run.dir / "tensorboard"
    if start_step is not None and folder.is_dir():
        for path in sorted(folder.glob("events.out.tfevents.*")):
            drop_events_after(path, start_step)
    writer = SummaryWriter(str(folder))

    def sink(kind: str, metrics: dict) -> None:
        if kind == "histograms":
            for name, v in metrics.items():
                if name != "step":
                    writer.add_histogram(name, v, metrics["step"])
            return
        for name, v in metric_items(kind, metrics):
            writer.add_scalar(name, v, metrics["step"])
    return writer, sink


def drop_events_after(path: Path, step: int) -> int:
    """Rewrite a TensorBoard event file (atomically) without its events of steps after `step`; the
    number of events dropped. A torn record at the end of a killed process's file is dropped too."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    kept, dropped = [], 0
    for raw in RawEventFileLoader(str(path)).Load():
        event = event_pb2.Event.FromString(raw)
        if event.step > step and event.WhichOneof("what") in ("summary", "log_message"):
            dropped += 1
        else:
            kept.append(raw)
    if dropped:
        def write(f):
            w = RecordWriter(f)
            for raw in kept:
                w.write(raw)
        atomic_write(path, write)
    return dropped


class Deferred:
    """A sink made on its first record: a run refused before its first step (a bad resume, bad
    settings) leaves train.log, TensorBoard's and W&B's files as they were."""

    def __init__(self, start):
        self.start, self.sink, self.closer = start, None, None

    def __call__(self, kind: str, metrics: dict) -> None:
        if self.sink is None:
            self.closer, self.sink = self.start()
        self.sink(kind, metrics)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()


def start_sinks(cfg: SinkConfig, run: RunFolder, header: dict) -> tuple[list, list]:
    """The log sinks this run asked for, and how to close each (rank 0 only). Each starts writing at
    the run's first record (see Deferred)."""
    start_step = run.resume_point.checkpoint["step"] if run.resume_point else None

    def file_log():
        log = FileLog(run.dir / "train.log", header, start_step)
        return log.close, log

    def tensorboard():
        writer, sink = start_tensorboard(run, start_step)
        return writer.close, sink

    def wandb_run():
        wb, sink = start_wandb(cfg, run, header)
        return wb.finish, sink

    if cfg.wandb:
        try:
            import wandb  # noqa: F401 (asked now: a missing package is said before the run starts)
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install -r requirements.txt")
    sinks = [Deferred(start) for start, on in ((file_log, True), (wandb_run, cfg.wandb), (tensorboard, cfg.tensorboard))
             if on]
    return sinks, [s.close for s in sinks]
