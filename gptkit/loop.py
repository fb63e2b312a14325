"""One training step and what it reports: `train_step` (micro-batches, autocast, scaled backward,
unscale, the metrics, clip, the step's one all-reduce, then update or skip), the settings and state of
a run's loop (`TrainConfig`, `TrainState`), the progress bar and log line (`Reporter`) and the clean
stop on a signal (`StopSignal`). The loop itself is gptkit/trainer.py's `Trainer.train`."""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from gptkit.data.batches import BatchSampler
from gptkit.loss import calc_loss_batch
from gptkit.metrics import STEP_METRICS, HostContext, StepContext, device_metrics, format_log_line, host_metrics, update_metrics
from gptkit.progress import progress_bar, progress_write
from gptkit.runtime import Runtime


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    seed: int = 0  # batch order
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    log_every: int = 10  # 0: only the last step
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
    metric_settings: dict = field(default_factory=dict)  # {metric name: its settings} (metrics with a config)

    def __post_init__(self):
        """Each count checked in one line (from Python as from the flags): *_every 0 means "never"
        (log_every and eval_every: only at the last step)."""
        from gptkit.errors import UserError

        for name, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("eval_iters", 1),
                          ("max_bad_steps", 1), ("sample_tokens", 1), ("log_every", 0), ("eval_every", 0),
                          ("sample_every", 0), ("save_every", 0), ("keep_last", 0), ("histogram_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"TrainConfig.{name} must be a whole number >= {low}, got {value!r}")


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
class StepResult:
    metrics: dict  # every device metric, reduced over the ranks as it declares (loss, grad_norm, ...)
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
               on_grads: Callable[[], None] | None = None, metric_settings: dict | None = None) -> StepResult:
    """One optimizer step: `grad_accum_steps` micro-batches (forward under autocast, scaled backward,
    gradients synchronised on the last), unscale, the gradient norm, the metrics (they see the
    gradients before clipping, and the clip factor), clip, then one all-reduce that carries every
    device metric and makes every rank agree on skipping a non-finite step and on stopping; after the
    update, the metrics that look at it. The values stay on the device until that reduction: one host
    sync per step (fp16's scaler adds its own). `should_stop` is asked at the reduction (a signal
    during this step stops after it); `on_grads` sees the unscaled gradients before clipping."""
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
    grads = [p.grad for p in params if p.grad is not None]
    norm = get_total_norm(grads) if grads else torch.zeros((), device=runtime.device)
    full_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).to(runtime.device)  # FSDP: all shards
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    ctx = StepContext(loss_sum, full_norm, model, optimizer,
                      batches.batch_size * batches.dataset.context_length * grad_accum_steps,
                      clip_coef=torch.clamp(limit / (full_norm + 1e-6), max=1.0), sharded=runtime.fsdp,
                      world_size=runtime.world_size, settings=metric_settings or {})
    values = measure(device_metrics(), "device", ctx)  # before clipping: the metrics see the raw gradients
    clip_grads_with_norm_(params, limit, norm)
    metrics, flags = _reduce(values, runtime, ctx.loss, should_stop)
    if flags["bad"]:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return StepResult(metrics, skipped=True, stop=flags["stop"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    after = update_metrics()
    if after:
        metrics.update(_reduce(measure(after, "after_update", ctx), runtime)[0])
    return StepResult(metrics, skipped=False, stop=flags["stop"])


def measure(specs, hook: str, ctx: StepContext) -> list[tuple]:
    """(spec, its value as a 1-D float tensor) of each metric's `hook`, each called with its settings."""
    out = []
    for m in specs:
        ctx.config = ctx.settings.get(m.name) or (m.config() if m.config is not None else None)
        out.append((m, getattr(m, hook)(ctx).detach().float().reshape(-1)))
    ctx.config = None
    return out


def _reduce(values: list[tuple], runtime: Runtime, loss: torch.Tensor | None = None,
            should_stop=None) -> tuple[dict, dict]:
    """The step's reduction: every metric across the ranks as it declares (mean, sum, max, or the
    shards of a sharded statistic), with whether some rank's loss was not finite and whether some rank
    was asked to stop. Sums in one all-reduce, maxima in a second only if a metric asks for one."""
    import torch.distributed as dist

    device = loss.device if loss is not None else runtime.device
    summed = [v for m, v in values if m.reduce != "max"]
    flags = [] if loss is None else [(~torch.isfinite(loss)).float().reshape(1),
                                     torch.tensor([float(bool(should_stop and should_stop()))], device=device)]
    sums = torch.cat([*summed, *flags]) if summed or flags else torch.zeros(0, device=device)
    maxes = torch.cat([v for m, v in values if m.reduce == "max"] or [torch.zeros(0, device=device)])
    if runtime.world_size > 1:
        dist.all_reduce(sums)
        if maxes.numel():
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    sums, maxes = sums.cpu(), maxes.cpu()  # the step's host sync
    out, i, j = {}, 0, 0
    for m, v in values:
        n = v.numel()
        if m.reduce == "max":
            reduced, j = maxes[j : j + n], j + n
        else:
            reduced, i = sums[i : i + n], i + n
            if m.reduce == "mean" or (m.reduce == "shards" and not runtime.fsdp):
                reduced = reduced / runtime.world_size
        out[m.name] = m.finish(reduced) if m.finish is not None else float(reduced[0])
    flag = sums[i:].tolist()
    return out, {"bad": bool(flag[0]) if flag else False, "stop": bool(flag[1]) if flag else False}


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


class Reporter:
    """The progress bar and the log line of each logging step (rank 0). tok/s, ms/step and MFU are
    averaged over the steps since the previous log line."""

    def __init__(self, runtime: Runtime, tcfg: TrainConfig, state: TrainState, sinks, tokens_per_step: int,
                 flops_tok: float, peak_flops: float | None):
        self.runtime, self.tcfg, self.sinks = runtime, tcfg, sinks
        self.tokens_per_step, self.flops_tok, self.peak_flops = tokens_per_step, flops_tok, peak_flops
        self.steps, self.seconds = 0, 0.0  # since the last log line
        self.bar = None  # made at the first step: a resumed run's bar starts at the step it resumed from

    def _bar(self, step: int):
        if self.bar is None and self.tcfg.progress and self.runtime.is_main:
            self.bar = progress_bar(total=self.tcfg.max_steps, initial=step - 1, unit="step", desc="training",
                                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                               "{rate_fmt}]{postfix}")
        return self.bar

    def step(self, state: TrainState, r: StepResult, lr: float, dt: float) -> dict:
        """This step's metrics (device and host); logged to the line and the sinks at a logging step."""
        self.steps, self.seconds = self.steps + 1, self.seconds + dt
        host = HostContext(lr, self.tokens_per_step * self.steps / self.seconds, 1000 * self.seconds / self.steps, None)
        if self.peak_flops:  # per GPU: the step's FLOPs are spread over world_size devices
            host.mfu = self.flops_tok * host.tokens_per_sec / self.runtime.world_size / self.peak_flops
        metrics = {"step": state.step, "max_steps": self.tcfg.max_steps, **r.metrics,
                   **{m.name: m.host(host) for m in host_metrics()}, "tokens_seen": state.tokens_seen}
        bar = self._bar(state.step)
        if bar is not None:  # the postfix first: a plain progress line shows this step's values
            bar.set_postfix(refresh=False, loss=f"{r.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{host.tokens_per_sec:,.0f}")
            bar.update(1)
        last = state.step == self.tcfg.max_steps
        if self.runtime.is_main and (last or (self.tcfg.log_every > 0 and state.step % self.tcfg.log_every == 0)):
            progress_write(format_log_line(metrics))
            for sink in self.sinks:
                sink("train", metrics)
            self.steps, self.seconds = 0, 0.0
        return metrics

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


