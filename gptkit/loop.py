"""The training loop, in two levels: `train_step` (one optimizer step: micro-batches, autocast,
scaled backward, unscale and clip, the step's one all-reduce, then update or skip) and `train_model`
(the schedule: the LR of each step, and when to log, evaluate, sample and save). A run's variable
parts come in as hooks; what a step reports comes from the metric registry (gptkit/metrics.py)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gptkit.data.batches import BatchSampler
from gptkit.loss import calc_loss_batch
from gptkit.metrics import STEP_METRICS, HostContext, StepContext, device_metrics, format_log_line, host_metrics
from gptkit.model import flops_per_token, unwrap_model
from gptkit.progress import progress_bar, progress_write
from gptkit.runtime import Runtime


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    seed: int = 0  # batch order
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end of the run (with validation data)
    eval_iters: int = 10
    sample_every: int = 0  # 0: never
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    save_every: int = 0  # 0: only at the end and on a signal
    keep_last: int = 3  # this run's checkpoints kept (0: all)
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    histogram_every: int = 0  # parameter and gradient histograms to the log sinks (0: never)
    progress: bool = True


def _new_history() -> dict:
    return {"step": [], "tokens_seen": [], "train_loss": [], "lr": [], "grad_norm": [],
            "val_step": [], "val_loss": [], "val_train_loss": []}


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    stop_reason: str = ""
    saved_step: int = -1  # the step of the last checkpoint written or resumed from
    history: dict = field(default_factory=_new_history)

    def record_step(self, metrics: dict, tokens: int) -> None:
        """A finished step: its metrics that have a history key (loss, lr, grad_norm, ...) go to history."""
        self.step += 1
        self.bad_steps = 0
        self.tokens_seen += tokens
        self.history["step"].append(self.step)
        self.history["tokens_seen"].append(self.tokens_seen)
        for name, spec in STEP_METRICS.items():
            if spec.history and metrics.get(name) is not None:
                self.history.setdefault(spec.history, []).append(metrics[name])

    def record_eval(self, values: dict, step_key: str = "val_step") -> None:
        """An evaluation at this step: its values by name (val_loss, val_train_loss, or another
        evaluation's), and the step under `step_key`."""
        self.history.setdefault(step_key, []).append(self.step)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.history = state["history"] or _new_history()
        self.saved_step = self.step


@dataclass
class TrainHooks:
    """The variable parts of a run. evaluate, sample and checkpoint run on every rank (they use the
    model or a collective; only rank 0 prints or writes); log sinks are called on rank 0 only, with
    (kind, metrics) where kind is "train", "eval" or "histograms"."""
    evaluate: Callable[[TrainState], None] | None = None  # after each step; runs what is due, records history
    sample: Callable[[TrainState], None] | None = None
    checkpoint: Callable[[TrainState], None] | None = None
    histograms: Callable[[int], None] | None = None  # called with the step, while its gradients exist
    log: list[Callable[[str, dict], None]] = field(default_factory=list)


@dataclass
class StepResult:
    metrics: dict  # every device metric, averaged over the ranks (loss, grad_norm, ...)
    skipped: bool  # the loss was not finite on some rank: no update was made
    stop: bool  # some rank received a stop signal

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    @property
    def grad_norm(self) -> float:
        return self.metrics["grad_norm"]


def train_step(model: nn.Module, optimizer, batches: BatchSampler, runtime: Runtime, grad_accum_steps: int,
               max_grad_norm: float, scaler, should_stop: Callable[[], bool] | None = None,
               on_grads: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step: `grad_accum_steps` micro-batches (forward under autocast, scaled backward,
    gradients synchronised on the last), unscale and clip, then one all-reduce that carries every
    device metric and makes every rank agree on skipping a non-finite step and on stopping. The
    values stay on the device until that reduction: one host sync per step (fp16's scaler adds its
    own). `should_stop` is asked at the reduction (a signal during this step stops after it);
    `on_grads` sees the unscaled gradients before clipping (histograms)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(grad_accum_steps):
        x, y = batches.next()
        with runtime.grad_sync(model, micro == grad_accum_steps - 1):
            with runtime.autocast():
                loss = calc_loss_batch(x, y, model, runtime.device, compiled=runtime.compile) / grad_accum_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    scaler.unscale_(optimizer)
    if on_grads is not None:
        on_grads()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    ctx = StepContext(loss_sum, grad_norm.to(runtime.device), model, optimizer,
                      batches.batch_size * batches.dataset.context_length * grad_accum_steps)
    metrics, bad, stop = _reduce(ctx, runtime, should_stop)
    if bad:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return StepResult(metrics, skipped=True, stop=stop)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(metrics, skipped=False, stop=stop)


def _reduce(ctx: StepContext, runtime: Runtime, should_stop) -> tuple[dict, bool, bool]:
    """The step's one all-reduce: every device metric (averaged over the ranks), whether some rank's
    loss was not finite, and whether some rank was asked to stop."""
    import torch.distributed as dist

    specs = device_metrics()
    flags = [(~torch.isfinite(ctx.loss)).float(),
             torch.tensor(float(bool(should_stop and should_stop())), device=ctx.loss.device)]
    stats = torch.stack([m.device(ctx).float().reshape(()) for m in specs] + flags)
    if runtime.world_size > 1:
        dist.all_reduce(stats)
    values = [v / runtime.world_size for v in stats.tolist()]
    return {m.name: v for m, v in zip(specs, values)}, bool(values[-2]), bool(values[-1])


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so an interrupted run saves a checkpoint and
    returns cleanly instead of dying mid-step. A second Ctrl-C aborts at once. Under torchrun it also
    watches the launcher: workers whose launcher was killed (kill -9) save and stop instead of
    training on with nobody to report to."""

    POLL_S = 1.0

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        self._done = threading.Event()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
            threading.Thread(target=self._watch_launcher, args=(os.getppid(),), name="launcher-watch",
                             daemon=True).start()
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing this step, saving a checkpoint and stopping "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr)

    def _watch_launcher(self, parent: int) -> None:
        while not self._done.wait(self.POLL_S):
            if os.getppid() != parent:  # the launcher died: this process was handed to another parent
                if self.received is None:
                    self.received = "launcher gone"
                    print(f"\nthe launcher (pid {parent}) is gone: finishing this step, saving a checkpoint and "
                          "stopping", file=sys.stderr)
                return

    def __exit__(self, *exc):
        self._done.set()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Reporter:
    """The progress bar and the log line of each logging step (rank 0). tok/s, ms/step and MFU are
    averaged over the steps since the previous log line."""

    def __init__(self, runtime: Runtime, tcfg: TrainConfig, state: TrainState, sinks, tokens_per_step: int,
                 flops_tok: float, peak_flops: float | None):
        self.runtime, self.tcfg, self.sinks = runtime, tcfg, sinks
        self.tokens_per_step, self.flops_tok, self.peak_flops = tokens_per_step, flops_tok, peak_flops
        self.steps, self.seconds = 0, 0.0  # since the last log line
        self.bar = None
        if tcfg.progress and runtime.is_main:
            self.bar = progress_bar(total=tcfg.max_steps, initial=state.step, unit="step", desc="training",
                                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                               "{rate_fmt}]{postfix}")

    def step(self, state: TrainState, r: StepResult, lr: float, dt: float) -> dict:
        """This step's metrics (device and host); logged to the line and the sinks at a logging step."""
        self.steps, self.seconds = self.steps + 1, self.seconds + dt
        host = HostContext(lr, self.tokens_per_step * self.steps / self.seconds, 1000 * self.seconds / self.steps, None)
        if self.peak_flops:  # per GPU: the step's FLOPs are spread over world_size devices
            host.mfu = self.flops_tok * host.tokens_per_sec / self.runtime.world_size / self.peak_flops
        metrics = {"step": state.step, "max_steps": self.tcfg.max_steps, **r.metrics,
                   **{m.name: m.host(host) for m in host_metrics()}, "tokens_seen": state.tokens_seen}
        if self.bar is not None:  # the postfix first: a plain progress line shows this step's values
            self.bar.set_postfix(refresh=False, loss=f"{r.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{host.tokens_per_sec:,.0f}")
            self.bar.update(1)
        last = state.step == self.tcfg.max_steps
        if self.runtime.is_main and (last or state.step % self.tcfg.log_every == 0):
            progress_write(format_log_line(metrics))
            for sink in self.sinks:
                sink("train", metrics)
            self.steps, self.seconds = 0, 0.0
        return metrics

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(model: nn.Module, optimizer, batches: BatchSampler, runtime: Runtime, tcfg: TrainConfig,
                lr_fn: Callable[[int], float] | None = None, state: TrainState | None = None,
                hooks: TrainHooks | None = None, peak_flops: float | None = None, scaler=None) -> TrainState:
    """The one training loop: a `train_step` per step from state.step to tcfg.max_steps, with the LR of
    the schedule, and the decisions of when to log, evaluate, sample and save. `model` may be wrapped
    (DDP, compiled). A finished run (state.step >= max_steps) is returned as it is."""
    state = state or TrainState()
    hooks = hooks or TrainHooks()
    scaler = scaler or runtime.grad_scaler()
    if state.step >= tcfg.max_steps:
        return state
    tokens_per_step = batches.batch_size * batches.dataset.context_length * tcfg.grad_accum_steps * runtime.world_size
    report = _Reporter(runtime, tcfg, state, hooks.log, tokens_per_step,
                       flops_per_token(unwrap_model(model).cfg, batches.dataset.context_length), peak_flops)
    model.train()
    with StopSignal() as stop:
        t_last = time.perf_counter()
        while state.step < tcfg.max_steps:
            lr = _set_lr(optimizer, lr_fn, state.step)
            r = train_step(model, optimizer, batches, runtime, tcfg.grad_accum_steps, tcfg.max_grad_norm, scaler,
                           lambda: stop.received is not None, _histograms_due(hooks, tcfg, state.step + 1))
            if r.skipped and _too_many_bad_steps(state, tcfg, runtime):
                break
            if not r.skipped:
                state.record_step({**r.metrics, "lr": lr}, tokens_per_step)
                report.step(state, r, lr, time.perf_counter() - t_last)
                _after_step(state, tcfg, hooks)
            if r.stop:
                state.stop_reason = stop.received or "SIGTERM"  # a signal seen by another rank
                break
            t_last = time.perf_counter()  # eval, sampling and saving are not training time
        report.close()
        # At the end, on a signal, and (last good weights) after bad steps. Still under StopSignal: a
        # scheduler's repeated SIGTERM (or torchrun forwarding it) must not kill the process mid-save.
        _save(hooks, state)
    return state


def _save(hooks: TrainHooks, state: TrainState) -> None:
    """A checkpoint of this step, unless there is no step yet or this step is already saved."""
    if hooks.checkpoint and state.step > 0 and state.saved_step != state.step:
        hooks.checkpoint(state)


def _due(every: int, state: TrainState) -> bool:
    return every > 0 and state.step % every == 0


def _histograms_due(hooks: TrainHooks, tcfg: TrainConfig, step: int) -> Callable[[], None] | None:
    if hooks.histograms and tcfg.histogram_every > 0 and step % tcfg.histogram_every == 0:
        return functools.partial(hooks.histograms, step)
    return None


def _set_lr(optimizer, lr_fn: Callable[[int], float] | None, step: int) -> float:
    """The schedule's LR for this step, set on every parameter group times the group's lr_scale (an
    optimizer's own LR for part of the model, as Muon's); without a schedule the optimizer's own."""
    if lr_fn is None:
        return optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
    lr = lr_fn(step)
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr
    return lr


def _after_step(state: TrainState, tcfg: TrainConfig, hooks: TrainHooks) -> None:
    """The evaluation hook after every step (it knows which of its evaluations are due: the validation
    loss every eval_every steps, each at the last step); a sample every sample_every; a checkpoint
    every save_every (the last step's is written when the loop ends)."""
    if hooks.evaluate:
        hooks.evaluate(state)
    if hooks.sample and _due(tcfg.sample_every, state):
        hooks.sample(state)
    if _due(tcfg.save_every, state) and state.step < tcfg.max_steps:
        _save(hooks, state)


def _too_many_bad_steps(state: TrainState, tcfg: TrainConfig, runtime: Runtime) -> bool:
    state.bad_steps += 1
    if runtime.is_main:
        progress_write(f"warning: non-finite loss at step {state.step + 1}; update skipped "
                       f"({state.bad_steps}/{tcfg.max_bad_steps} in a row)")
    if state.bad_steps < tcfg.max_bad_steps:
        return False
    state.stop_reason = (f"{state.bad_steps} non-finite losses in a row at step {state.step + 1}: "
                         "lower the learning rate, raise warmup, or use bf16 instead of fp16")
    return True
