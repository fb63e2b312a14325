"""The training loop of both scripts, on one screen: `Trainer.train()`. A Trainer is built once from its
parts (model, optimizer, data, runtime, settings, run folder, log sinks, evaluations); each thing
the loop does besides the step is a method of it, named for what it does (log, evaluate, sample,
save), so a reader follows the loop top to bottom and finds every call one click away, in this file.
`fit()` is the run around it: resume from the run folder, train, then losses.json, the plot and the
run's status.

The rank rule: evaluate, sample, save and the histograms run on every rank (they run the model or a
collective); only rank 0 prints, logs to sinks and writes files.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from gptkit import loop
from gptkit.checkpoint.folder import RunFolder
from gptkit.checkpoint.state import CheckpointState, DictPart, ModelPart, OptimizerPart, RNGPart, ScalerPart
from gptkit.cli import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, lost_peer
from gptkit.data.batches import BatchSampler, TokenWindowDataset, create_dataloader
from gptkit.errors import RunFailure
from gptkit.files import write_json
from gptkit.generation import generate_and_print_sample
from gptkit.loop import Reporter, StopSignal, TrainConfig, TrainState
from gptkit.loss import evaluate_model
from gptkit.model import flops_per_token, unwrap_model
from gptkit.progress import progress_write
from gptkit.runtime import Runtime
from gptkit.tokenizer import get_tokenizer

# How a run that stopped early ends: its exit code, and the status a requeue script reads.
STOP_EXIT = {"SIGTERM": EXIT_SIGTERM, "SIGINT": EXIT_SIGINT, "launcher gone": EXIT_SIGTERM}
HISTOGRAM_VALUES = 1 << 16  # values per tensor in a histogram: an even sample of larger tensors


class Trainer:
    def __init__(self, model: nn.Module, optimizer, runtime: Runtime, tcfg: TrainConfig,
                 train_data: TokenWindowDataset | None = None, val_data: TokenWindowDataset | None = None,
                 run: RunFolder | None = None, *, batches: BatchSampler | None = None, lr_fn=None, sinks=(),
                 evaluations=(), optimizer_spec=None, run_info: dict | None = None, peak_flops: float | None = None):
        self.model, self.optimizer, self.runtime, self.cfg, self.run = model, optimizer, runtime, tcfg, run
        self.raw = unwrap_model(model)
        self.say = progress_write if runtime.is_main else (lambda *a, **k: None)
        self.batches = batches or BatchSampler(train_data, tcfg.batch_size, tcfg.seed, runtime.rank,
                                               runtime.world_size, device=runtime.device)
        self.lr_fn, self.evaluations = lr_fn, tuple(evaluations)
        self.sinks = list(sinks) if runtime.is_main else []
        self.scaler = runtime.grad_scaler()  # its loss scale is part of an exact fp16 resume
        self.state = TrainState()
        self.saved: list[Path] = []
        self.val_loaders = self._val_loaders(train_data, val_data)
        ctx = self.batches.dataset.context_length
        self.tokens_per_step = tcfg.batch_size * ctx * tcfg.grad_accum_steps * runtime.world_size
        self.report = Reporter(runtime, tcfg, self.state, self.sinks, self.tokens_per_step,
                               flops_per_token(self.raw.cfg, ctx), peak_flops)
        self.checkpoint = None if run is None else CheckpointState(
            self.raw.cfg, run.run_id, model=ModelPart(self.raw), optimizer=OptimizerPart(optimizer, self.raw, optimizer_spec),
            data=self.batches, scaler=ScalerPart(self.scaler), rng=RNGPart(runtime.rank, runtime.world_size, self.say),
            progress=self.state, run=DictPart({"run_id": run.run_id, "tokenizer": get_tokenizer().record(),
                                               **(run_info or {})}))

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """A step at a time to max_steps: the LR of the schedule, the step, then what is due after it
        (log, evaluate, sample, save); stop early on a signal or too many non-finite losses."""
        state, cfg = self.state, self.cfg
        if state.step >= cfg.max_steps:
            return state
        if state.step == 0:
            self.evaluate()  # the starting point of the curves
        self.model.train()
        with StopSignal() as stop:
            t_last = time.perf_counter()
            while state.step < cfg.max_steps:
                lr = self.set_lr(state.step)
                result = self.step(stop)
                if result.skipped and self.too_many_bad_steps():
                    break
                if not result.skipped:
                    state.record_step({**result.metrics, "lr": lr}, self.tokens_per_step)
                    self.log(result, lr, time.perf_counter() - t_last)
                    self.evaluate()
                    if _due(cfg.sample_every, state.step):
                        self.sample()
                    if _due(cfg.save_every, state.step) and state.step < cfg.max_steps:
                        self.save()
                if result.stop:
                    state.stop_reason = stop.received or "SIGTERM"  # a signal seen by another rank
                    break
                t_last = time.perf_counter()  # evaluating, sampling and saving are not training time
            self.report.close()
            # At the end, on a signal, and (the last good weights) after bad steps. Still under StopSignal: a
            # scheduler's repeated SIGTERM (or torchrun forwarding it) must not kill the process mid-save.
            self.save()
        return state

    # -- what the loop calls ----------------------------------------------------------------------

    def set_lr(self, step: int) -> float:
        """The schedule's LR for this step on every parameter group, times the group's lr_scale (an
        optimizer's own LR for part of the model, as Muon's); without a schedule the optimizer's own."""
        groups = self.optimizer.param_groups
        if self.lr_fn is None:
            return groups[0]["lr"] / groups[0].get("lr_scale", 1.0)
        lr = self.lr_fn(step)
        for g in groups:
            g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr
        return lr

    def step(self, stop: StopSignal) -> loop.StepResult:
        """One optimizer step (gptkit.loop.train_step), the histograms of its gradients when due."""
        histograms = self.histograms if self.sinks and _due(self.cfg.histogram_every, self.state.step + 1) else None
        return loop.train_step(self.model, self.optimizer, self.batches, self.runtime, self.cfg.grad_accum_steps,
                               self.cfg.max_grad_norm, self.scaler, lambda: stop.received is not None, histograms,
                               self.cfg.metric_settings)

    def log(self, result: loop.StepResult, lr: float, seconds: float) -> None:
        self.report.step(self.state, result, lr, seconds)

    def evaluate(self) -> None:
        """What is due at this step: the validation loss and bits per byte every eval_every steps, each
        evaluation every its own steps; all of them at step 0 (if any is periodic) and at the end."""
        step, last = self.state.step, self.state.step == self.cfg.max_steps
        eval_model = self.model.module if hasattr(self.model, "no_sync") else self.model  # no gradient sync
        if self.val_loaders and (last or _due(self.cfg.eval_every, step)):
            tl, vl, bpb = evaluate_model(eval_model, *self.val_loaders, self.runtime.device, self.cfg.eval_iters,
                                         self.runtime.autocast(), self.runtime, with_bpb=True)
            self.state.record_eval({"val_loss": vl, "val_train_loss": tl, "val_bpb": bpb})
            self.say(f"eval step {step}: train loss {tl:.4f} | val loss {vl:.4f} | val bpb {bpb:.4f}")
            self._to_sinks("eval", {"step": step, "val_loss": vl, "train_loss": tl})
            self._to_sinks("val", {"step": step, "bpb": bpb})
        for e in self.evaluations:
            if last or _due(e.every, step):
                values = e.fn(eval_model)
                self.state.record_eval(values, step_key=f"{e.name}_step")
                self.say(f"eval step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
                self._to_sinks("eval", {"step": step, **values})

    def sample(self) -> None:
        generate_and_print_sample(self.raw, get_tokenizer(), self.runtime.device, self.cfg.sample_prompt,
                                  self.cfg.sample_tokens, printer=lambda t: self.say(f"sample step {self.state.step}: {t}"))

    def save(self) -> None:
        """A checkpoint of this step (every rank takes part: the RNG part gathers, FSDP ranks write
        their shards), unless there is no step yet or this one is saved."""
        st = self.state
        if self.checkpoint is None or st.step == 0 or st.saved_step == st.step:
            return
        ckpt = self.checkpoint.state_dict()
        if self.runtime.fsdp:
            self.saved.append(self.run.save_sharded(ckpt, self.runtime.rank))
        elif self.runtime.is_main:
            self.saved.append(self.run.save(ckpt))
        st.saved_step = st.step

    def too_many_bad_steps(self) -> bool:
        st, cfg = self.state, self.cfg
        st.bad_steps += 1
        self.say(f"warning: non-finite loss at step {st.step + 1}; update skipped ({st.bad_steps}/{cfg.max_bad_steps} "
                 "in a row)")
        if st.bad_steps < cfg.max_bad_steps:
            return False
        st.stop_reason = (f"{st.bad_steps} non-finite losses in a row at step {st.step + 1}: lower the learning rate, "
                          "raise warmup, or use bf16 instead of fp16")
        return True

    def histograms(self) -> None:
        """Parameter and gradient values of every weight (an even sample of at most HISTOGRAM_VALUES each;
        under FSDP of rank 0's shard), to the sinks (rank 0), while this step's gradients exist."""
        values = {"step": self.state.step + 1}
        for name, p in self.raw.named_parameters():
            values[f"params/{name}"] = _sampled(p)
            if p.grad is not None:
                values[f"grads/{name}"] = _sampled(p.grad)
        self._to_sinks("histograms", values)

    # -- around the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        """The run: resume from the run folder's checkpoint, train, then losses.json, the plot and the
        run's status in run.json (a failure's too). result["exit_code"]: 0, or 143/130 after a signal."""
        self.resume()
        self.run.started = True  # from here on the run's status tells what became of it
        if self.runtime.is_main:
            self.run.keep_tokenizer(get_tokenizer())
        try:
            self.train()
        except BaseException as e:
            if self.runtime.is_main:
                self.run.set_status(outcome(e), self.state.step, f"{type(e).__name__}: {str(e)[:200]}",
                                    checkpoint_step=self.state.saved_step if self.state.saved_step >= 0 else None)
            raise
        return self.finish()

    def resume(self) -> None:
        run, st = self.run, self.state
        if run.resume_point is not None:
            self.checkpoint.load_state_dict(run.resume_point.checkpoint)
            self.say(f"resumed from {run.resume_point.path} at step {st.step} ({st.tokens_seen:,} tokens seen)")
            run.resume_point = None  # its tensors are in place; drop the mapping
        if st.step >= self.cfg.max_steps:
            self.say(f"nothing to do: the run is already at step {st.step} of {self.cfg.max_steps}")

    def finish(self) -> dict:
        st, run = self.state, self.run
        failed = st.bad_steps >= self.cfg.max_bad_steps
        result = {"state": st, "history": st.history, "checkpoint": self.saved[-1] if self.saved else None,
                  "run_dir": run.dir, "run_id": run.run_id, "stop_reason": st.stop_reason,
                  "exit_code": STOP_EXIT.get(st.stop_reason, EXIT_OK)}
        if self.runtime.is_main:
            h = st.history
            result["losses"] = write_json(run.dir / "losses.json", h)
            if h["step"]:
                from gptkit.run import plot_losses

                result["plot"] = plot_losses(h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"],
                                             run.dir / "loss_plot.png", val_steps=h["val_step"])
            if self.saved:
                self.say(f"checkpoint: {self.saved[-1]}")
            run.set_status("failed" if failed else "stopped" if st.stop_reason else "finished", st.step, st.stop_reason)
        if failed:
            raise RunFailure(f"training stopped: {st.stop_reason} (the last good weights are in {run.dir})")
        return result

    def _val_loaders(self, train_data, val_data):
        if val_data is None:
            return None
        global_batch = self.cfg.batch_size * self.runtime.world_size  # split across the ranks by evaluate_model
        return (create_dataloader(train_data, global_batch, shuffle=False, drop_last=True) if train_data else None,
                create_dataloader(val_data, global_batch, shuffle=False, drop_last=False))

    def _to_sinks(self, kind: str, values: dict) -> None:
        for sink in self.sinks:
            sink(kind, values)


def _due(every: int, step: int) -> bool:
    """Every `every` steps (0: never)."""
    return every > 0 and step % every == 0


def _sampled(t: torch.Tensor) -> torch.Tensor:
    # FSDP: rank 0's shard, a sample of the tensor already, and no collective (only rank 0 logs).
    t = t.to_local() if hasattr(t, "to_local") else t
    flat = t.detach().flatten()
    return flat[:: -(-flat.numel() // HISTOGRAM_VALUES)].float().cpu()


def outcome(e: BaseException) -> str:
    """How an exception ends a run, in run.json's words: stopped (Ctrl-C), crashed (another process died
    or was lost: resume it), failed (a restart would repeat it)."""
    if isinstance(e, KeyboardInterrupt):
        return "stopped"
    return "crashed" if lost_peer(e) else "failed"
