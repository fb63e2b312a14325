"""The settings both training scripts share, as typed components (one dataclass each, a flag per
field with its help and range check), the parser sections that expose them, and what follows from
them once parsed: the model config, the default run folder, the run's recorded settings.
Registered optimizers, schedules and attentions contribute their names and their own flags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gptkit.attention import ATTENTIONS
from gptkit.config import add_flags, at_least, between, from_args, setting
from gptkit.errors import UserError
from gptkit.loop import TrainConfig
from gptkit.model import PRESETS, GPTConfig, get_config
from gptkit.optim import OPTIMIZERS, OptimArgs, optimizer_spec
from gptkit.schedules import SCHEDULES, ScheduleConfig


@dataclass
class RunArgs:
    run_dir: Path | None = setting(None, "the run's folder: checkpoints, logs, plot (default: runs/<script>-<model>-<hash "
                                         "of the settings>, so the same command finds its run again and other settings "
                                         "get their own)", aliases=("--output_dir",))
    resume: str | None = setting(None, "'auto' (newest valid checkpoint in --run_dir) or a checkpoint path")
    overwrite: bool = setting(False, "start over in a --run_dir that holds another run: its files are moved to "
                                     "previous/, not deleted")
    init_from: str | None = setting(None, "start from weights only: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a HF GPT-2 "
                                          "folder or a checkpoint (the --model preset must match them)")
    save_every: int = setting(500, "checkpoint every N steps, besides the end and a signal (0: only those)",
                              aliases=("--save_ckpt_freq",), check=(at_least(0), ">= 0"))
    keep_last: int = setting(3, "this run's checkpoints kept in --run_dir (0: all)", check=(at_least(0), ">= 0 (0: keep all)"))
    seed: int = setting(0, "random seed (init, batch order, dropout)",
                        check=(lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"))


@dataclass
class ModelArgs:
    model: str = setting("124M", "preset: " + ", ".join(PRESETS) + " (or gpt2, gpt2-medium, ...)")
    context_length: int | None = setting(None, "override the preset's context length",
                                         check=(lambda v: 1 <= v <= 65536, "between 1 and 65536"))
    drop_rate: float | None = setting(None, "dropout rate (preset: 0)", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    n_layers: int | None = setting(None, "override the preset's number of blocks", check=(at_least(1), "at least 1"))
    n_heads: int | None = setting(None, "override the preset's attention heads", check=(at_least(1), "at least 1"))
    emb_dim: int | None = setting(None, "override the preset's width", check=(at_least(1), "at least 1"))
    qkv_bias: bool | None = setting(None, "bias in the q/k/v projection (preset default: on)")
    attention: str = setting("causal", "the attention (a registered kind)")
    flash: bool = setting(True, "SDPA attention (flash/memory-efficient kernels); --no-flash uses explicit masked softmax")
    pad_vocab: bool | None = setting(None, "round the embedding and head rows up to a multiple of 64 (50257 -> 50304) "
                                           "for faster GPU matmuls; exports cut them back (default: on for CUDA; a "
                                           "resumed run keeps its checkpoint's)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: less "
                                                    "memory, ~1/3 more compute")

    def config(self) -> GPTConfig:
        return get_config(self.model, n_layers=self.n_layers, n_heads=self.n_heads, emb_dim=self.emb_dim,
                          context_length=self.context_length, drop_rate=self.drop_rate, qkv_bias=self.qkv_bias,
                          attention=self.attention, flash=self.flash, activation_checkpointing=self.activation_checkpointing)


@dataclass
class BatchArgs:
    batch_size: int = setting(8, "sequences per micro-batch per device", check=(at_least(1), "at least 1"))
    grad_accum: int = setting(1, "micro-batches per optimizer step", check=(at_least(1), "at least 1"))
    max_steps: int | None = setting(None, "optimizer steps (default: one epoch)", check=(at_least(1), "at least 1"))


@dataclass
class RuntimeArgs:
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "autocast precision (auto: bf16 where the device computes it natively, else fp32)",
                         choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")


@dataclass
class LogArgs:
    log_every: int = setting(10, "log line every N steps", check=(at_least(1), "at least 1"))
    eval_every: int = setting(500, "validation loss every N steps (0: only at the end)", aliases=("--eval_freq",),
                              check=(at_least(0), ">= 0"))
    eval_iters: int = setting(20, "batches per evaluation", aliases=("--eval_iter",), check=(at_least(1), "at least 1"))
    sample_every: int = setting(1000, "print a generated sample every N steps (0: never)",
                                aliases=("--print_sample_iter",), check=(at_least(0), ">= 0"))
    sample_prompt: str = setting("Every effort moves you", "prompt for the samples", aliases=("--start_context",))
    max_bad_steps: int = setting(3, "stop after this many non-finite losses in a row", check=(at_least(1), "at least 1"))
    progress: bool = setting(True, "show a progress bar")
    debug: bool = setting(False, "a smoke run: the debug preset for 20 steps, logging, evaluating and sampling every few "
                                 "steps (flags you give win; not with --model)")


# Flags that say how to run, not what to train: they do not change the default run folder's name.
RUN_MECHANICS = {"run_dir", "resume", "overwrite", "max_steps", "n_epochs", "train_tokens", "log_every", "eval_every",
                 "eval_iters", "sample_every", "sample_prompt", "save_every", "keep_last", "progress", "device",
                 "compile", "wandb", "wandb_project", "wandb_run_name", "tensorboard", "histogram_every",
                 "prepare_only", "estimate_memory", "gpu_memory_gb", "debug", "cache_dir", "max_bad_steps",
                 "activation_checkpointing", "dtype", "flash", "pad_vocab", "peak_tflops", "hellaswag", "hellaswag_every",
                 "hellaswag_limit"}
# The settings whose values named default run folders before settings were typed components; any
# other setting joins the name only when it differs from its default, so old runs are found again.
HASHED_BEFORE = {
    "pretraining_simple": {"batch_size", "context_length", "data_dir", "drop_rate", "grad_accum", "init_from", "lr",
                           "max_grad_norm", "model", "seed", "val_fraction", "weight_decay"},
    "pretraining_advanced": {"batch_size", "beta1", "beta2", "context_length", "cpu_offload", "data", "data_mix",
                             "dist_timeout_min", "drop_rate", "emb_dim", "fsdp", "galore_proj_type", "galore_rank",
                             "galore_scale", "galore_update_proj_gap", "grad_accum", "init_from", "lr", "max_grad_norm",
                             "max_tokens", "min_lr", "model", "n_heads", "n_layers", "optimizer", "qkv_bias", "seed",
                             "shard_tokens", "smollm_dir", "text_column", "total_batch_tokens", "val_fraction",
                             "warmup_steps", "weight_decay"},
}
RENAMED = {"cache_max_tokens": "max_tokens"}  # new name -> the name its value was hashed under
DEBUG_DEFAULTS = {"max_steps": 20, "eval_every": 10, "sample_every": 10, "log_every": 5}


def add_shared_flags(p: argparse.ArgumentParser, **defaults) -> None:
    """The flags both training scripts take (one name each; older names stay as aliases), with the
    script's own defaults; each registered optimizer's settings in a group of its own."""
    add_flags(p.add_argument_group("run folder"), RunArgs, **defaults)
    add_flags(p.add_argument_group("model"), ModelArgs, **defaults)
    _set_choices(p, "attention", ATTENTIONS)
    add_flags(p.add_argument_group("batch"), BatchArgs, **defaults)
    add_flags(p.add_argument_group("optimizer"), OptimArgs, **defaults)
    _set_choices(p, "optimizer", OPTIMIZERS)
    for name, spec in OPTIMIZERS.items():
        if spec.config is not None:
            add_flags(p.add_argument_group(f"--optimizer {name}"), spec.config, prefix=name)
    add_flags(p.add_argument_group("learning-rate schedule"), ScheduleConfig, **defaults)
    _set_choices(p, "schedule", SCHEDULES)
    add_flags(p.add_argument_group("precision and speed"), RuntimeArgs, **defaults)
    add_flags(p.add_argument_group("evaluation and logging"), LogArgs, **defaults)


def _set_choices(p: argparse.ArgumentParser, dest: str, registry: dict) -> None:
    action = next(a for a in p._actions if a.dest == dest)
    action.choices = list(registry)
    action.help = f"{action.help}: {', '.join(registry)}"


@dataclass
class SharedSettings:
    """The shared components of a parsed command line, and which flags were typed."""
    run: RunArgs
    model: ModelArgs
    batch: BatchArgs
    optim: OptimArgs
    optimizer_config: object  # the chosen optimizer's own settings (None if it has none)
    schedule: ScheduleConfig
    runtime: RuntimeArgs
    log: LogArgs
    given: set[str]


def shared_settings(args: argparse.Namespace, given: set[str]) -> SharedSettings:
    """The shared components from parsed flags: checked, --debug applied, conflicts refused."""
    apply_debug(args, given)
    optim = from_args(OptimArgs, args)
    spec = optimizer_spec(optim.optimizer)
    for name, other in OPTIMIZERS.items():  # another optimizer's settings typed: refused, not ignored
        for f in dataclasses.fields(other.config) if other.config is not None and name != optim.optimizer else ():
            if f"{name}_{f.name}" in given:
                raise UserError(f"--{name}_{f.name} is a setting of --optimizer {name}; this run uses --optimizer "
                                f"{optim.optimizer}")
    if "resume" in given and "init_from" in given:
        raise UserError("--resume and --init_from cannot be used together: --resume continues a run (weights, "
                        "optimizer, data position), --init_from starts a new one from weights only")
    return SharedSettings(from_args(RunArgs, args), from_args(ModelArgs, args), from_args(BatchArgs, args), optim,
                          from_args(spec.config, args, prefix=spec.name) if spec.config else None,
                          from_args(ScheduleConfig, args), from_args(RuntimeArgs, args), from_args(LogArgs, args), given)


def apply_debug(args: argparse.Namespace, given: set[str]) -> None:
    """--debug: the debug preset and a short, chatty run; flags typed beside it keep their values."""
    if not args.debug:
        return
    if "model" in given:
        raise UserError("--debug and --model cannot be used together: --debug is the debug preset; drop one of them")
    args.model = "debug"
    for k, v in DEBUG_DEFAULTS.items():
        if k not in given:
            setattr(args, k, v)
    if "batch_size" not in given:
        args.batch_size = min(args.batch_size, 4)


def train_config(s: SharedSettings, max_steps: int, grad_accum: int | None = None,
                 histogram_every: int = 0) -> TrainConfig:
    """The loop's settings from the shared components."""
    return TrainConfig(max_steps=max_steps, batch_size=s.batch.batch_size, grad_accum_steps=grad_accum or s.batch.grad_accum,
                       seed=s.run.seed, max_grad_norm=s.optim.max_grad_norm, log_every=s.log.log_every,
                       eval_every=s.log.eval_every, eval_iters=s.log.eval_iters, sample_every=s.log.sample_every,
                       sample_prompt=s.log.sample_prompt, save_every=s.run.save_every, keep_last=s.run.keep_last,
                       max_bad_steps=s.log.max_bad_steps, histogram_every=histogram_every, progress=s.log.progress)


def args_to_dict(args: argparse.Namespace) -> dict:
    """Parsed flags as JSON-safe values, for checkpoints and run logs."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def default_run_dir(script: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """runs/<script>-<model>-<hash of the settings that define the run>. Settings that named runs
    before always count; newer ones only when they differ from their default (so an older run's
    command finds its folder again)."""
    defaults = {a.dest: a.default for a in parser._actions}
    before = HASHED_BEFORE.get(script, set())
    settings = {}
    for k, v in sorted(args_to_dict(args).items()):
        name = RENAMED.get(k, k)
        if k in RUN_MECHANICS or (name not in before and v == defaults.get(k)):
            continue
        settings[name] = v
    digest = hashlib.sha256(json.dumps(dict(sorted(settings.items())), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path("runs") / f"{script.removeprefix('pretraining_')}-{args.model}-{digest}"


__all__ = ["RunArgs", "ModelArgs", "BatchArgs", "RuntimeArgs", "LogArgs", "add_shared_flags", "shared_settings",
           "default_run_dir", "args_to_dict", "between"]
