"""The settings both training scripts share, as typed components (one dataclass each, a flag per
field with its help and range check), the parser sections that expose them, and what follows from
them once parsed: the model config, the default run folder, the run's recorded settings.
Registered optimizers, schedules and attentions contribute their names and their own flags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gptkit.attention import ATTENTIONS
from gptkit.components import add_component_flags, refuse_unselected, set_choices, settings
from gptkit.config import add_flags, at_least, between, finite, flag_name, from_args, refuse_together, setting
from gptkit.errors import UserError
from gptkit.loop import TrainConfig
from gptkit.metrics import STEP_METRICS
from gptkit.model import PRESETS, GPTConfig, get_config
from gptkit.optim import OPTIMIZERS, OptimArgs, optimizer_spec
from gptkit.parts import ARCHS
from gptkit.plugins import add_plugin_flag
from gptkit.schedules import SCHEDULES, ScheduleConfig, resolve, schedule_spec


@dataclass
class RunArgs:
    run_dir: Path | None = setting(None, "the run's folder: checkpoints, logs, plot (default: runs/<script>-<model>-<hash "
                                         "of the settings>, so the same command finds its run again and other settings "
                                         "get their own)", aliases=("--output_dir",))
    resume: str | None = setting(None, "'auto' (newest valid checkpoint in --run_dir) or a checkpoint path")
    overwrite: bool = setting(False, "start over in a --run_dir that holds another run: its files are moved to "
                                     "previous/, not deleted")
    init_from: str | None = setting(None, "start from weights only: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging "
                                          "Face GPT-2, Llama, Qwen3 or Mistral folder, or a checkpoint (the model "
                                          "flags must describe the same model; a rotary model may train at another "
                                          "context)")
    save_every: int = setting(500, "checkpoint every N steps, besides the end and a signal (0: only those)",
                              aliases=("--save_ckpt_freq",), check=(at_least(0), ">= 0"))
    keep_last: int = setting(3, "this run's checkpoints kept in --run_dir (0: all)", check=(at_least(0), ">= 0 (0: keep all)"))
    seed: int = setting(0, "random seed (init, batch order, dropout)",
                        check=(lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"))
    check: bool = setting(False, "check the settings and inputs (data, the checkpoint --resume would take, "
                                 "--init_from) and say what the run would do, then exit touching nothing (launch.py "
                                 "does it before starting any worker)")


@dataclass
class ModelArgs:
    tokenizer: str | None = setting(None, "gpt2 (GPT-2's 50,257-token BPE), or a tokenizer folder (tokenizer.py train, "
                                          "or a Hugging Face folder's tokenizer.json); the model's vocabulary follows it "
                                          "(default: --init_from's own, else gpt2)")
    model: str = setting("124M", "size preset: " + ", ".join(PRESETS) + " (or gpt2, gpt2-medium, ...)")
    arch: str = setting("gpt2", "a named set of block parts (each part below can be set on top of it, for ablations)")
    depth: int | None = setting(None, "model size as one dial, as nanochat: depth blocks, 64 x depth wide, heads of 128 "
                                      "(of 64 when depth is odd); the preset's context length",
                                check=(at_least(1), "at least 1"))
    context_length: int | None = setting(None, "override the preset's context length",
                                         check=(lambda v: 1 <= v <= 65536, "between 1 and 65536"))
    drop_rate: float | None = setting(None, "dropout rate (preset: 0)", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    n_layers: int | None = setting(None, "override the preset's number of blocks", check=(at_least(1), "at least 1"))
    n_heads: int | None = setting(None, "override the preset's attention heads", check=(at_least(1), "at least 1"))
    emb_dim: int | None = setting(None, "override the preset's width", check=(at_least(1), "at least 1"))
    n_kv_heads: int | None = setting(None, "key/value heads, fewer than --n_heads for grouped-query attention (default: "
                                           "one per query head)", check=(at_least(1), "at least 1"))
    attention: str | None = setting(None, "the attention (default: the arch's)")
    position: str | None = setting(None, "how positions enter the model (default: the arch's)")
    norm: str | None = setting(None, "the normalisation of the blocks, the final one and QK-norm (default: the arch's)")
    mlp: str | None = setting(None, "the MLP of each block (default: the arch's)")
    init: str | None = setting(None, "the initialisation (default: the arch's)")
    qk_norm: bool | None = setting(None, "normalise each head's queries and keys (default: the arch's)")
    embed_norm: bool | None = setting(None, "a norm right after the token embedding (default: the arch's)")
    bias: bool | None = setting(None, "biases in the projections, MLPs and norms (default: the arch's)")
    qkv_bias: bool | None = setting(None, "bias in the q/k/v projection (default: the arch's; GPT-2: on)")
    tie_embeddings: bool | None = setting(None, "one matrix for the token embedding and the output head (default: "
                                                "the arch's; GPT-2: tied)")
    flash: bool = setting(True, "SDPA attention (flash/memory-efficient kernels); --no-flash uses explicit masked softmax")
    pad_vocab: bool | None = setting(None, "round the embedding and head rows up to a multiple of 64 (50257 -> 50304) "
                                           "for faster GPU matmuls; exports cut them back (default: on for CUDA; a "
                                           "resumed run keeps its checkpoint's)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: less "
                                                    "memory, ~1/3 more compute")

    @property
    def label(self) -> str:
        """The size as the user chose it: the preset, or the depth dial."""
        return f"depth {self.depth}" if self.depth is not None else self.model


PART_FLAGS = ("attention", "position", "norm", "mlp", "init", "qk_norm", "embed_norm", "bias", "qkv_bias",
              "tie_embeddings", "n_kv_heads")  # GPTConfig fields an arch sets and a flag may override


def part_registries() -> dict:
    """{GPTConfig field: registry} of the pluggable block parts."""
    from gptkit.parts import INITS, MLPS, NORMS, POSITIONS

    return {"attention": ATTENTIONS, "position": POSITIONS, "norm": NORMS, "mlp": MLPS, "init": INITS}


def depth_sizes(depth: int) -> dict:
    """nanochat's one dial: depth blocks of width 64 x depth, in heads of 128 (an odd depth: of 64)."""
    width = 64 * depth
    return dict(n_layers=depth, emb_dim=width, n_heads=width // 128 if depth % 2 == 0 else depth)


def model_config(m: ModelArgs, args: argparse.Namespace, given: set[str]) -> GPTConfig:
    """The model config: the preset's sizes (or --depth's), the arch's parts, each part flag typed on
    top, and the chosen parts' settings (typed > the arch's > the part's default), all recorded."""
    arch = ARCHS.spec(m.arch)
    if m.depth is not None:
        typed = [k for k in ("n_layers", "emb_dim", "n_heads") if k in given]
        if typed:
            raise UserError(f"--depth and --{typed[0]} cannot be used together: --depth sets the number of blocks, the "
                            "width and the heads")
    fields = {**arch.fields, **{k: getattr(m, k) for k in PART_FLAGS if getattr(m, k) is not None}}
    parts = {}
    for key, registry in part_registries().items():
        name = fields.get(key, getattr(GPTConfig, key))
        refuse_unselected(registry, name, given)
        spec = registry.spec(name)
        if spec.config is not None:
            parts[name] = _part_settings(spec, arch.parts.get(name, {}), args, given)
    sizes = depth_sizes(m.depth) if m.depth is not None else {}
    overrides = {**dict(n_layers=m.n_layers, n_heads=m.n_heads, emb_dim=m.emb_dim), **sizes}
    from gptkit.tokenizer import get_tokenizer

    return get_config(m.model, **overrides, context_length=m.context_length, drop_rate=m.drop_rate, flash=m.flash,
                      activation_checkpointing=m.activation_checkpointing, **fields, parts=parts,
                      vocab_size=get_tokenizer().n_vocab)


# The flags that set each architecture field, besides the field's own flag (--arch sets every part).
SETTERS = {"n_layers": ("model", "depth"), "emb_dim": ("model", "depth"), "n_heads": ("model", "depth"),
           "context_length": ("model",), **{k: ("arch",) for k in PART_FLAGS}}
NOT_WEIGHTS = ("init", "vocab_multiple")  # what --init_from's weights replace, or the run chooses itself


def choose_tokenizer(flag: str | None, init_from: str | None):
    """The tokenizer of this run, made the process's (gptkit.tokenizer.use_tokenizer): --tokenizer, else
    the one --init_from's source carries, else GPT-2's. --tokenizer and a source's own must agree."""
    from gptkit.tokenizer import use_tokenizer
    from gptkit.weights import source_tokenizer

    given = use_tokenizer(flag or "gpt2")
    if init_from:
        theirs = source_tokenizer(init_from)
        if flag is None:
            return use_tokenizer(theirs)
        if theirs.fingerprint() != given.fingerprint():
            raise UserError(f"--tokenizer {flag} is not the tokenizer of --init_from {init_from} ({theirs.name}, "
                            f"{theirs.n_vocab:,} ids); drop --tokenizer: a model continues with its own")
    return given


def start_config(cfg: GPTConfig, source: str, given: set[str]) -> GPTConfig:
    """The model --init_from describes, as litgpt takes it: every architecture field and part setting
    from the source (a checkpoint, an export, a Hugging Face folder), so no flag needs typing. A flag
    typed that disagrees with it is refused in one line naming the flag; the context may differ where
    the positions allow it (rotary: any length; a learned table: its own length only)."""
    from gptkit.model import ARCH_FIELDS
    from gptkit.weights import source_config

    src = source_config(source)
    out = {}
    for k in ARCH_FIELDS:
        theirs, ours = src.get(k, getattr(GPTConfig, k, None)), getattr(cfg, k)
        typed = [f for f in (k, *SETTERS.get(k, ())) if f in given]
        if k in NOT_WEIGHTS or theirs == ours or k == "parts":
            continue
        if k == "context_length" and src.get("position") == "rotary":
            continue  # rotary positions train at any context: the one the flags (or the preset) give
        if typed:
            raise UserError(f"--{typed[0]} disagrees with --init_from {source}, whose model has {k}={theirs} (this "
                            f"flag makes it {ours}); drop --{typed[0]}: the model comes from --init_from")
        out[k] = theirs
    return dataclasses.replace(cfg, **out, parts=_start_parts(cfg.parts, src.get("parts") or {}, source, given))


def _start_parts(ours: dict, theirs: dict, source: str, given: set[str]) -> dict:
    """The source's part settings; one typed on the command line must agree."""
    for part, values in theirs.items():
        for field, value in values.items():
            flag = flag_name(part, field)
            if flag in given and ours.get(part, {}).get(field) != value:
                raise UserError(f"--{flag} disagrees with --init_from {source}, whose model has {value}; drop --{flag}: "
                                "the model comes from --init_from")
    return {k: dict(v) for k, v in theirs.items()}


def _part_settings(spec, arch_values: dict, args: argparse.Namespace, given: set[str]) -> dict:
    """A part's settings, each field from the flag if it was typed, else the arch's, else its default."""
    values = {}
    for f in dataclasses.fields(spec.config):
        dest = flag_name(spec.name, f.name)
        values[f.name] = getattr(args, dest) if dest in given or f.name not in arch_values else arch_values[f.name]
    return values


@dataclass
class BatchArgs:
    batch_size: int = setting(8, "sequences per micro-batch per device", check=(at_least(1), "at least 1"))
    grad_accum: int = setting(1, "micro-batches per optimizer step", check=(at_least(1), "at least 1"))
    max_steps: int | None = setting(None, "optimizer steps (default: one epoch)", check=(at_least(1), "at least 1"))
    tokens_per_param: float | None = setting(None, "set the number of steps to train on R tokens per parameter of the "
                                                   "model (given alone: 20, Chinchilla's compute-optimal R; every "
                                                   "parameter counts, the embeddings and an untied head too)",
                                             check=(lambda v: finite(v) and v > 0, "a number > 0"), metavar="R",
                                             const=20.0)


@dataclass
class RuntimeArgs:
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "autocast precision (auto: bf16 where the device computes it natively, else fp32)",
                         choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")


@dataclass
class LogArgs:
    log_every: int = setting(10, "log line every N steps (0: only the last step)", check=(at_least(0), ">= 0"))
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
                 "hellaswag_limit", "check", "config", "plugin"}  # and every evaluation's flags (default_run_dir)
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
    script's own defaults; each registered component's settings in a group of its own."""
    g = p.add_argument_group("settings from a file, components from a plugin")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings from a .toml or .yaml file (keys are the flags' names; a table [NAME] holds a "
                        "component's, e.g. [muon] lr = 0.02); flags on the command line override it")
    add_plugin_flag(g)
    add_flags(p.add_argument_group("run folder"), RunArgs, **defaults)
    add_flags(p.add_argument_group("model"), ModelArgs, **defaults)
    set_choices(p, "arch", ARCHS)
    for dest, registry in part_registries().items():
        set_choices(p, dest, registry)
        add_component_flags(p, registry)
    add_flags(p.add_argument_group("batch"), BatchArgs, **defaults)
    add_flags(p.add_argument_group("optimizer"), OptimArgs, **defaults)
    set_choices(p, "optimizer", OPTIMIZERS)
    add_component_flags(p, OPTIMIZERS)
    add_flags(p.add_argument_group("learning-rate schedule"), ScheduleConfig, **defaults)
    set_choices(p, "schedule", SCHEDULES)
    add_component_flags(p, SCHEDULES)
    add_flags(p.add_argument_group("precision and speed"), RuntimeArgs, **defaults)
    add_flags(p.add_argument_group("evaluation and logging"), LogArgs, **defaults)
    add_component_flags(p, STEP_METRICS)


@dataclass
class SharedSettings:
    """The shared components of a parsed command line, and which flags were typed."""
    run: RunArgs
    model: ModelArgs
    batch: BatchArgs
    optim: OptimArgs
    optimizer_config: object  # the chosen optimizer's own settings (None if it has none)
    schedule: ScheduleConfig
    schedule_config: object  # the chosen schedule's own settings (None if it has none)
    runtime: RuntimeArgs
    log: LogArgs
    given: set[str]
    model_config: GPTConfig  # the model the flags describe (vocab_multiple is decided with the run folder)
    plugins: list = dataclasses.field(default_factory=list)  # gptkit.plugins.Plugin, as loaded for this run
    metric_settings: dict = dataclasses.field(default_factory=dict)  # {metric name: its settings}


def shared_settings(args: argparse.Namespace, given: set[str], plugins: list | None = None) -> SharedSettings:
    """The shared components from parsed flags: checked, --debug applied, conflicts refused."""
    apply_debug(args, given)
    optim = from_args(OptimArgs, args)
    spec = optimizer_spec(optim.optimizer)
    refuse_unselected(OPTIMIZERS, optim.optimizer, given)  # another optimizer's settings: refused, not ignored
    schedule = from_args(ScheduleConfig, args)
    refuse_unselected(SCHEDULES, schedule.schedule, given)
    refuse_together(given, *(("tokens_per_param", other, "--tokens_per_param sets the number of steps")
                             for other in ("max_steps", "train_tokens", "n_epochs")))
    if "resume" in given and "init_from" in given:
        raise UserError("--resume and --init_from cannot be used together: --resume continues a run (weights, "
                        "optimizer, data position), --init_from starts a new one from weights only")
    schedule_config = settings(schedule_spec(schedule.schedule), args)
    resolve(schedule, optim.lr, 1, given, schedule_config)  # a setting the schedule ignores, --min_lr above --lr
    model, run = from_args(ModelArgs, args), from_args(RunArgs, args)
    choose_tokenizer(model.tokenizer, run.init_from)
    cfg = model_config(model, args, given)
    if run.init_from:
        cfg = start_config(cfg, run.init_from, given)
    return SharedSettings(run, model, from_args(BatchArgs, args), optim, settings(spec, args),
                          schedule, schedule_config, from_args(RuntimeArgs, args),
                          from_args(LogArgs, args), given, cfg, list(plugins or []),
                          {name: settings(spec, args) for name, spec in STEP_METRICS.configured()})


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


def steps_for_tokens_per_param(s: SharedSettings, tokens_per_step: int) -> int:
    """--tokens_per_param R: the steps that train on R tokens for each of the model's parameters."""
    from gptkit.model import count_parameters_from_config

    params = count_parameters_from_config(s.model_config)["total"]
    return max(1, math.ceil(s.batch.tokens_per_param * params / tokens_per_step))


def train_config(s: SharedSettings, max_steps: int, grad_accum: int | None = None,
                 histogram_every: int = 0) -> TrainConfig:
    """The loop's settings from the shared components."""
    return TrainConfig(max_steps=max_steps, batch_size=s.batch.batch_size, grad_accum_steps=grad_accum or s.batch.grad_accum,
                       seed=s.run.seed, max_grad_norm=s.optim.max_grad_norm, log_every=s.log.log_every,
                       eval_every=s.log.eval_every, eval_iters=s.log.eval_iters, sample_every=s.log.sample_every,
                       sample_prompt=s.log.sample_prompt, save_every=s.run.save_every, keep_last=s.run.keep_last,
                       max_bad_steps=s.log.max_bad_steps, histogram_every=histogram_every, progress=s.log.progress,
                       metric_settings=s.metric_settings)


def args_to_dict(args: argparse.Namespace) -> dict:
    """Parsed flags as JSON-safe values, for checkpoints and run logs."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def default_run_dir(script: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """runs/<script>-<model>-<hash of the settings that define the run>. Settings that named runs
    before always count; newer ones only when they differ from their default (so an older run's
    command finds its folder again)."""
    from gptkit.config import flags_of
    from gptkit.evals import EVALS

    defaults = {a.dest: a.default for a in parser._actions}
    before = HASHED_BEFORE.get(script, set())
    mechanics = RUN_MECHANICS | {d for spec in EVALS.values() for d in flags_of(spec.config, spec.name)}
    settings = {}
    for k, v in sorted(args_to_dict(args).items()):
        name = RENAMED.get(k, k)
        if k in mechanics or (name not in before and v == defaults.get(k)):
            continue
        settings[name] = v
    digest = hashlib.sha256(json.dumps(dict(sorted(settings.items())), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path("runs") / f"{script.removeprefix('pretraining_')}-{args.model}-{digest}"


__all__ = ["RunArgs", "ModelArgs", "BatchArgs", "RuntimeArgs", "LogArgs", "add_shared_flags", "shared_settings",
           "default_run_dir", "args_to_dict", "between"]
