"""Around the loop: the run folder claimed (and resumed from) on rank 0 and shared with every rank
(`open_run`), or only checked (`check_run`, the scripts' --check); the run itself (`run_training`: a
gptkit/trainer.py Trainer, fitted); the loss plot."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from gptkit.checkpoint.folder import ResumePoint, RunFolder
from gptkit.checkpoint.state import (
    OptimizerPart,
    check_config_matches,
)
from gptkit.checkpoint.store import peek_checkpoint
from gptkit.data.batches import TokenWindowDataset
from gptkit.errors import CheckpointError
from gptkit.files import atomic_write
from gptkit.loop import TrainConfig
from gptkit.progress import progress_write
from gptkit.runtime import Runtime, broadcast_from_main


@dataclass
class Evaluation:
    """An evaluation beside the validation loss (HellaSwag, ...): run every `every` steps and at the
    end, on every rank; `fn(model)` returns its values by name (logged as eval/NAME)."""
    name: str
    every: int
    fn: Callable[[nn.Module], dict]


def open_run(runtime: Runtime, run_dir, script: str, settings: dict, resume: str | None = None,
             overwrite: bool = False, keep_last: int = 3, checkpoint_bytes: int = 0, plugins=(),
             accept: Callable[[dict], None] | None = None) -> RunFolder:
    """Claim the run folder on rank 0 (lock, ownership, --resume resolved once, `accept(checkpoint)`
    refusing a checkpoint of another model before anything is written, run.json) and tell every rank
    the run id and the checkpoint to resume from. Release it with `run.release()` (or `holding(run)`).
    A process group that torchrun restarted (--max_restarts) continues from its newest checkpoint."""
    say = progress_write if runtime.is_main else (lambda *_: None)
    run = RunFolder(run_dir, keep_last, log=say)
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        say("torchrun restarted this run: resuming from its newest checkpoint (as --resume auto)")
        resume = "auto"

    def claim():
        run.claim(script, settings, resume, overwrite, checkpoint_bytes, plugins, accept)
        point = run.resume_point
        return run.run_id, str(point.path) if point else None

    run_id, resume_path = broadcast_from_main(runtime, claim)
    if not runtime.is_main:
        run.run_id = run_id
        if resume_path is not None:  # rank 0 verified the checksum; the others map the same file
            run.resume_point = ResumePoint(Path(resume_path), peek_checkpoint(resume_path))
    return run


@contextlib.contextmanager
def holding(run: RunFolder):
    """The claimed run folder while the run uses it: released at the end; and a run that fails or is
    refused before its first step (its checkpoint of another model, settings only the data can
    contradict) leaves run.json as it found it (RunFolder.undo_claim)."""
    try:
        yield run
    except BaseException:
        run.undo_claim()
        raise
    finally:
        run.release()


def check_run(run_dir, cfg, resume: str | None, overwrite: bool, optimizer_kind: str, pad_vocab: bool | None,
              what: str, plugins=(), say: Callable[[str], None] = print) -> dict:
    """--check: what the run would do in `run_dir`, decided as the real run decides it but read-only:
    the folder claimed or refused, the checkpoint --resume would take (loaded, checksummed, of this
    model and optimizer; a sharded one read through the allowlist), in one line and a JSON line.
    Anything the run would refuse is the same one error line here."""
    import json

    point = RunFolder(run_dir, log=lambda *_: None).preview(resume, overwrite, plugins)
    resumes = None
    if point is not None:
        ckpt = point.checkpoint
        check_resume(ckpt, cfg, optimizer_kind, pad_vocab)
        if ckpt.get("sharded"):
            from gptkit.weights import load_sharded_weights

            load_sharded_weights(point.path, ckpt)  # data only: a crafted shard is refused here, before any worker
        resumes = {"path": str(point.path), "step": ckpt["step"]}
    where = f"resumes {resumes['path']} at step {resumes['step']}" if resumes else "starts from step 0"
    say(f"check ok: run folder {run_dir} ({where}) | {what}")
    result = {"check": "ok", "run_dir": str(run_dir), "resume": resumes}
    say(json.dumps(result))
    return result


def check_resume(ckpt: dict, cfg, optimizer_kind: str, pad_vocab: bool | None) -> None:
    """A checkpoint to resume is of this model (every part, the vocabulary padding --pad_vocab asks
    for, else its own) and of this optimizer's kind: one error line otherwise."""
    from gptkit.tokenizer import from_record, get_tokenizer

    theirs, ours = from_record((ckpt.get("run") or {}).get("tokenizer")), get_tokenizer()
    if theirs.fingerprint() != ours.fingerprint():
        raise CheckpointError(f"the checkpoint was trained with tokenizer {theirs.name} ({theirs.n_vocab:,} ids), this run "
                              f"has {ours.name} ({ours.n_vocab:,} ids); resume with --tokenizer naming the same one")
    vm = (64 if pad_vocab else 1) if pad_vocab is not None else int(ckpt["config"].get("vocab_multiple", 1))
    check_config_matches(ckpt["config"], dataclasses.replace(cfg, vocab_multiple=vm))
    saved = (ckpt.get("optimizer") or {}).get("kind") or ckpt.get("optimizer_kind")
    if saved and saved != optimizer_kind:
        OptimizerPart.check_kind_against(saved, optimizer_kind)


def vocab_multiple_for(pad_vocab: bool | None, runtime: Runtime, run: RunFolder) -> int:
    """--pad_vocab as given; else what the checkpoint being resumed used; else 64 on CUDA, 1 elsewhere."""
    if pad_vocab is not None:
        return 64 if pad_vocab else 1
    if run.resume_point is not None:
        return int(run.resume_point.checkpoint["config"].get("vocab_multiple", 1))
    return 64 if runtime.device.type == "cuda" else 1


def main_printer(runtime: Runtime) -> Callable[[str], None]:
    """progress_write on the main rank, silence on the others."""
    return progress_write if runtime.is_main else (lambda *a, **k: None)


def run_training(model: nn.Module, optimizer, runtime: Runtime, tcfg: TrainConfig, train_data: TokenWindowDataset,
                 val_data: TokenWindowDataset | None, run: RunFolder, *, lr_fn=None, log_sinks=(),
                 peak_flops: float | None = None, run_info: dict | None = None, optimizer_spec=None,
                 evaluations: tuple[Evaluation, ...] = ()) -> dict:
    """The run both scripts share: a Trainer (gptkit/trainer.py) of these parts, fitted. `model` may be
    DDP/compile-wrapped. result["exit_code"] is 0, or 143/130 after SIGTERM/SIGINT."""
    from gptkit.trainer import Trainer

    return Trainer(model, optimizer, runtime, tcfg, train_data, val_data, run, lr_fn=lr_fn, sinks=log_sinks,
                   evaluations=evaluations, optimizer_spec=optimizer_spec, run_info=run_info,
                   peak_flops=peak_flops).fit()


def plot_losses(steps, tokens_seen, train_losses, val_losses, path, val_steps=None) -> Path:
    """Loss against step, with tokens seen on a second x-axis, saved as PNG (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, train_losses, label="train loss")
    if val_losses:
        ax.plot(val_steps if val_steps is not None else steps, val_losses, "--", marker="o", ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    if len(steps) and len(tokens_seen) and steps[-1] > 0:
        ratio = tokens_seen[-1] / steps[-1]  # tokens per step is constant within a run
        top = ax.secondary_xaxis("top", functions=(lambda s: s * ratio, lambda t: t / ratio))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
