"""Around the loop: what both training scripts share once they have a model, an optimizer and data.
The run folder is claimed (and resumed from) on rank 0 and shared with every rank; deterministic
batches; evaluation, sampling, histograms and checkpoints as the loop's hooks; at the end losses.json,
loss_plot.png and the run's status in run.json (what a requeue script reads)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from gptkit.checkpoint.folder import ResumePoint, RunFolder
from gptkit.checkpoint.state import CheckpointState, DictPart, ModelPart, OptimizerPart, RNGPart, ScalerPart
from gptkit.checkpoint.store import peek_checkpoint
from gptkit.cli import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from gptkit.data.batches import BatchSampler, TokenWindowDataset, create_dataloader
from gptkit.errors import RunFailure
from gptkit.files import atomic_write, write_json
from gptkit.generation import generate_and_print_sample
from gptkit.loop import TrainConfig, TrainHooks, TrainState, train_model
from gptkit.loss import evaluate_model
from gptkit.model import unwrap_model
from gptkit.progress import progress_write
from gptkit.runtime import Runtime, broadcast_from_main
from gptkit.tokenizer import get_tokenizer

# How a run that stopped early ends: its exit code, and the status a requeue script reads.
STOP_EXIT = {"SIGTERM": EXIT_SIGTERM, "SIGINT": EXIT_SIGINT, "launcher gone": EXIT_SIGTERM}


@dataclass
class Evaluation:
    """An evaluation beside the validation loss (HellaSwag, ...): run every `every` steps and at the
    end, on every rank; `fn(model)` returns its values by name (logged as eval/NAME)."""
    name: str
    every: int
    fn: Callable[[nn.Module], dict]


def open_run(runtime: Runtime, run_dir, script: str, settings: dict, resume: str | None = None,
             overwrite: bool = False, keep_last: int = 3, checkpoint_bytes: int = 0) -> RunFolder:
    """Claim the run folder on rank 0 (lock, ownership, --resume resolved once, run.json) and tell every
    rank the run id and the checkpoint to resume from. Release it with `run.release()`. A process
    group that torchrun restarted (--max_restarts) continues from the newest checkpoint by itself."""
    say = progress_write if runtime.is_main else (lambda *_: None)
    run = RunFolder(run_dir, keep_last, log=say)
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        say("torchrun restarted this run: resuming from its newest checkpoint (as --resume auto)")
        resume = "auto"

    def claim():
        run.claim(script, settings, resume, overwrite, checkpoint_bytes)
        point = run.resume_point
        return run.run_id, str(point.path) if point else None

    run_id, resume_path = broadcast_from_main(runtime, claim)
    if not runtime.is_main:
        run.run_id = run_id
        if resume_path is not None:  # rank 0 verified the checksum; the others map the same file
            run.resume_point = ResumePoint(Path(resume_path), peek_checkpoint(resume_path))
    return run


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
    """Everything around the loop that both scripts share: deterministic batches, resume from the run
    folder's resume point, eval, sampling, checkpoints, and losses.json + loss_plot.png at the end.
    `model` may be DDP/compile-wrapped. result["exit_code"] is 0, or 143/130 after SIGTERM/SIGINT."""
    raw = unwrap_model(model)
    say = main_printer(runtime)
    batches = BatchSampler(train_data, tcfg.batch_size, tcfg.seed, runtime.rank, runtime.world_size,
                           device=runtime.device)
    scaler = runtime.grad_scaler()  # its loss scale is part of an exact fp16 resume
    state = TrainState()
    ckpt_state = CheckpointState(raw.cfg, run.run_id, model=ModelPart(raw),
                                 optimizer=OptimizerPart(optimizer, raw, optimizer_spec), data=batches,
                                 scaler=ScalerPart(scaler), rng=RNGPart(runtime.rank, runtime.world_size, say),
                                 progress=state, run=DictPart({"run_id": run.run_id, **(run_info or {})}))
    _resume(run, ckpt_state, state, tcfg, say)
    hooks = TrainHooks(evaluate=_evaluator(model, runtime, tcfg, train_data, val_data, log_sinks, say, evaluations),
                       sample=_sampler(raw, runtime, tcfg, say), histograms=_histogrammer(raw, runtime, log_sinks),
                       log=list(log_sinks) if runtime.is_main else [])
    saved: list[Path] = []
    hooks.checkpoint = _checkpointer(ckpt_state, run, runtime, saved)
    if state.step == 0 and hooks.evaluate and (tcfg.eval_every or any(e.every for e in evaluations)):
        hooks.evaluate(state)  # the starting point of the curve
    try:
        state = train_model(model, optimizer, batches, runtime, tcfg, lr_fn, state, hooks, peak_flops, scaler)
    except BaseException as e:
        if runtime.is_main:
            run.set_status("stopped" if isinstance(e, KeyboardInterrupt) else "failed", state.step,
                           f"{type(e).__name__}: {str(e)[:200]}")
        raise
    return _finish(state, run, runtime, tcfg, saved, say)


def _resume(run: RunFolder, ckpt_state: CheckpointState, state: TrainState, tcfg: TrainConfig, say) -> None:
    if run.resume_point is not None:
        ckpt_state.load_state_dict(run.resume_point.checkpoint)
        say(f"resumed from {run.resume_point.path} at step {state.step} ({state.tokens_seen:,} tokens seen)")
        run.resume_point = None  # its tensors are in place; drop the mapping
    if state.step >= tcfg.max_steps:
        say(f"nothing to do: the run is already at step {state.step} of {tcfg.max_steps}")


def _checkpointer(ckpt_state: CheckpointState, run: RunFolder, runtime: Runtime, saved: list):
    def checkpoint(st: TrainState):
        ckpt = ckpt_state.state_dict()  # every rank: the RNG part gathers across ranks
        if runtime.fsdp:  # every rank writes its shards
            saved.append(run.save_sharded(ckpt, runtime.rank))
        elif runtime.is_main:
            saved.append(run.save(ckpt))
        st.saved_step = st.step
    return checkpoint


def _evaluator(model, runtime: Runtime, tcfg: TrainConfig, train_data, val_data, log_sinks, say,
               evaluations: tuple[Evaluation, ...] = ()):
    """The evaluation hook: the validation loss every eval_every steps, each other evaluation every
    its own `every` steps, all of them at the last step (and at step 0)."""
    if val_data is None and not evaluations:
        return None
    eval_model = model.module if hasattr(model, "no_sync") else model  # evaluation needs no gradient sync
    global_batch = tcfg.batch_size * runtime.world_size  # split across the ranks by evaluate_model
    loaders = None
    if val_data is not None:
        loaders = (create_dataloader(train_data, global_batch, shuffle=False, drop_last=True),
                   create_dataloader(val_data, global_batch, shuffle=False, drop_last=False))
    sinks = log_sinks if runtime.is_main else ()

    def due(every: int, st: TrainState) -> bool:  # every N steps from step 0 on (0: never), and at the end
        return st.step == tcfg.max_steps or (every > 0 and st.step % every == 0)

    def evaluate(st: TrainState):
        if loaders is not None and due(tcfg.eval_every, st):
            tl, vl = evaluate_model(eval_model, *loaders, runtime.device, tcfg.eval_iters, runtime.autocast(), runtime)
            st.record_eval({"val_loss": vl, "val_train_loss": tl})
            say(f"eval step {st.step}: train loss {tl:.4f} | val loss {vl:.4f}")
            for sink in sinks:
                sink("eval", {"step": st.step, "val_loss": vl, "train_loss": tl})
        for e in evaluations:
            if due(e.every, st):
                values = e.fn(eval_model)
                st.record_eval(values, step_key=f"{e.name}_step")
                say(f"eval step {st.step}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
                for sink in sinks:
                    sink("eval", {"step": st.step, **values})
    return evaluate


def _sampler(raw: nn.Module, runtime: Runtime, tcfg: TrainConfig, say):
    tokenizer = get_tokenizer()

    def sample(st: TrainState):
        generate_and_print_sample(raw, tokenizer, runtime.device, tcfg.sample_prompt, tcfg.sample_tokens,
                                  printer=lambda t: say(f"sample step {st.step}: {t}"))
    return sample


HISTOGRAM_VALUES = 1 << 16  # values per tensor in a histogram: an even sample of larger tensors


def _sample(t: torch.Tensor) -> torch.Tensor:
    # FSDP: rank 0's shard, a sample of the tensor already, and no collective (only rank 0 logs).
    t = t.to_local() if hasattr(t, "to_local") else t
    flat = t.detach().flatten()
    return flat[:: -(-flat.numel() // HISTOGRAM_VALUES)].float().cpu()


def _histogrammer(raw: nn.Module, runtime: Runtime, log_sinks):
    """Parameter and gradient values of every weight (an even sample of at most HISTOGRAM_VALUES
    each; under FSDP of rank 0's shard), to the sinks as kind "histograms" (rank 0)."""
    if not log_sinks:
        return None

    def histograms(step: int):
        values = {"step": step}
        for name, p in raw.named_parameters():
            values[f"params/{name}"] = _sample(p)
            if p.grad is not None:
                values[f"grads/{name}"] = _sample(p.grad)
        for sink in log_sinks if runtime.is_main else ():
            sink("histograms", values)
    return histograms


def _finish(state: TrainState, run: RunFolder, runtime: Runtime, tcfg: TrainConfig, saved: list, say) -> dict:
    failed = state.bad_steps >= tcfg.max_bad_steps
    result = {"state": state, "history": state.history, "checkpoint": saved[-1] if saved else None,
              "run_dir": run.dir, "run_id": run.run_id, "stop_reason": state.stop_reason,
              "exit_code": STOP_EXIT.get(state.stop_reason, EXIT_OK)}
    if runtime.is_main:
        h = state.history
        result["losses"] = write_json(run.dir / "losses.json", h)
        if h["step"]:
            result["plot"] = plot_losses(h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"],
                                         run.dir / "loss_plot.png", val_steps=h["val_step"])
        if saved:
            say(f"checkpoint: {saved[-1]}")
        status = "failed" if failed else "stopped" if state.stop_reason else "finished"
        run.set_status(status, state.step, state.stop_reason)
    if failed:
        raise RunFailure(f"training stopped: {state.stop_reason} (the last good weights are in {run.dir})")
    return result


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
