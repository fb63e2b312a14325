"""Pretrain a GPT at scale: the production path. The same training loop as pretraining_simple.py,
with features switched on by flags: smollm-corpus streaming and a pre-tokenized cache, cosine LR with
warmup, clipping, checkpoint/resume, W&B and TensorBoard, DDP via torchrun, FSDP2, bf16/fp16, SDPA
attention, torch.compile, and the optimizers of the registry (AdamW, Muon, GaLore).

    python pretraining_advanced.py --model debug --max_steps 200            # CPU smoke run, embedded books
    python pretraining_advanced.py --data smollm:cosmopedia-v2 --cache_max_tokens 2e9 --prepare_only
    torchrun --standalone --nproc_per_node 8 pretraining_advanced.py --model 124M --data smollm:cosmopedia-v2 \\
        --cache_max_tokens 2e9 --total_batch_tokens 524288 --compile --wandb --run_dir runs/gpt2
    python pretraining_advanced.py --run_dir runs/gpt2 --resume auto        # continue after preemption

Exit codes: 0 finished, 143 stopped by SIGTERM after saving (requeue with --resume auto), 130 Ctrl-C,
2 bad input, 1 any other failure. Under torchrun the launcher's own exit code is not the workers':
`python run_status.py RUN_DIR` tells a requeue script what happened (143: resume it).
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import gpt_train as gt
from gptkit import evals
from gptkit import runtime as rt
from gptkit.args import SharedSettings, add_shared_flags, shared_settings
from gptkit.components import add_component_flags, settings
from gptkit.config import HelpFormatter, above, add_flags, at_least, between, from_args, parse, refuse_together, setting
from gptkit.data import cache as token_cache
from gptkit.data.sources import SOURCES, resolve_source
from gptkit.gutenberg.prepare import prepare_default_corpus
from gptkit.optim import build_optimizer, measured_state_bytes, optimizer_spec
from gptkit.planner import TrainSetup, machine_memory, memory_report, refuse_unfittable
from gptkit.plugins import preload
from gptkit.schedules import lr_function, resolve
from gptkit.sinks import SinkConfig, git_hash, library_versions, start_sinks
from gptkit.weights import new_model

SCRIPT = "pretraining_advanced"
DEFAULTS = dict(model="124M", batch_size=32, seed=1337, eval_every=500, eval_iters=20, sample_every=1000,
                save_every=1000, log_every=10, schedule="cosine", warmup_steps=2000)
CACHE_WAIT_S = 7 * 24 * 3600  # how long other ranks wait for rank 0's token cache build


@dataclass
class DataArgs:
    data: str = setting("gutenberg", "'gutenberg' (the embedded sample, cleaned by prep_dataset.py), smollm:SUBSET[,SUBSET] "
                                     "(cosmopedia-v2, fineweb-edu-dedup), a folder saved by datasets' save_to_disk, or "
                                     "local .txt/.jsonl/.json/.parquet files, folders or globs (comma-separated parts)")
    text_column: str = setting("text", "column holding the text in json/parquet/saved datasets")
    data_mix: str | None = setting(None, "token weights of the parts of --data (smollm subsets, or comma-separated local "
                                         "files/folders/globs), e.g. 0.7,0.3")
    smollm_dir: str | None = setting(None, "read smollm:SUBSET,... from this local snapshot of the corpus (one folder per "
                                           "subset) instead of the hub")
    cache_max_tokens: float | None = setting(None, "cap on the tokens taken from the source into the cache (not the "
                                                   "training budget: that is --train_tokens)", aliases=("--max_tokens",),
                                             check=(at_least(1), "a number of tokens >= 1"))
    val_fraction: float = setting(0.01, "share of the token stream held out for validation",
                                  check=(between(0, 1), "between 0 and 1"))
    cache_dir: Path | None = setting(None, "token cache folder (default: data/token_cache/<hash of the source and "
                                           "settings>)")
    shard_tokens: int = setting(100_000_000, "tokens per cache shard", check=(at_least(4096), "at least 4096"))
    prepare_only: bool = setting(False, "build the token cache and exit")


@dataclass
class BudgetArgs:
    total_batch_tokens: int | None = setting(None, "tokens per optimizer step across all devices; sets --grad_accum for "
                                                   "the device count", check=(at_least(1), "at least 1"))
    train_tokens: float | None = setting(None, "training budget in tokens (sets --max_steps)",
                                         check=(at_least(1), "a number of tokens >= 1"))


@dataclass
class ScaleArgs:
    fsdp: bool = setting(False, "shard parameters, gradients and optimizer state over the torchrun processes (FSDP2) "
                                "instead of keeping a whole copy on each (DDP): for models that do not fit one device")
    cpu_offload: bool = setting(False, "with --fsdp: keep parameters, gradients and optimizer state in host memory, on "
                                       "the GPU only while a block computes (the largest preset on one GPU)")
    estimate_memory: bool = setting(False, "print what training would need per device (parameters, gradients, "
                                           "optimizer, activations, logits), whether it fits and what would make it "
                                           "fit; then exit without training")
    gpu_memory_gb: float | None = setting(None, "device memory the estimate is held against (default: the GPU's, or 24)",
                                          check=(above(0), "a number of GB > 0"))
    dist_timeout_min: float = setting(30.0, "timeout of each collective under torchrun, in minutes (a token cache build "
                                            "on rank 0 is waited for outside collectives, however long it takes)",
                                      check=(above(0), "a number of minutes > 0"))
    peak_tflops: float | None = setting(None, "the GPU's dense bf16 peak in TFLOP/s for MFU (default: from a table of "
                                              "known GPUs)", check=(above(0), "a number > 0"))


@dataclass
class Settings:
    data: DataArgs
    budget: BudgetArgs
    scale: ScaleArgs
    sinks: SinkConfig
    evals: list  # enabled evaluations' configs (gptkit.evals)
    sources: dict  # {data source kind: its own settings} of the kinds that have some
    shared: SharedSettings
    args: argparse.Namespace  # as parsed: recorded in run.json and checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_flags(p.add_argument_group("data"), DataArgs)
    add_component_flags(p, SOURCES)
    add_shared_flags(p, **DEFAULTS)
    add_flags(p.add_argument_group("training budget"), BudgetArgs)
    add_flags(p.add_argument_group("log sinks"), SinkConfig)
    evals.add_eval_flags(p)
    add_flags(p.add_argument_group("distributed and memory"), ScaleArgs)
    return p


def parse_args(argv=None) -> Settings:
    plugins = preload(argv)  # before the parser: a plugin's components are choices and flags of it
    args, given = parse(build_parser(), argv)
    shared = shared_settings(args, given, plugins)
    s = Settings(from_args(DataArgs, args), from_args(BudgetArgs, args), from_args(ScaleArgs, args),
                 from_args(SinkConfig, args), evals.enabled(args, given),
                 {name: settings(spec, args) for name, spec in SOURCES.configured()}, shared, args)
    check_combinations(s, given)
    return s


def check_combinations(s: Settings, given: set[str]) -> None:
    """Flags that contradict each other or this machine, refused before any work."""
    refuse_together(given, ("grad_accum", "total_batch_tokens", "--total_batch_tokens sets the accumulation for the "
                                                                "device count"),
                    ("max_steps", "train_tokens", "--train_tokens sets the number of steps"))
    spec = optimizer_spec(s.shared.optim.optimizer)
    if s.scale.fsdp and spec.fsdp:
        raise gt.UserError(spec.fsdp)
    if s.scale.cpu_offload and not s.scale.fsdp:
        raise gt.UserError("--cpu_offload offloads FSDP's shards: add --fsdp (under torchrun, --nproc_per_node 1 for "
                           "one GPU)")
    if s.scale.fsdp and "WORLD_SIZE" not in os.environ and not (s.scale.estimate_memory or s.shared.run.check):
        raise gt.UserError("--fsdp shards over the processes torchrun starts: run it as torchrun --nproc_per_node N "
                           "pretraining_advanced.py --fsdp ... (N=1 with --cpu_offload for one GPU)")


# ----------------------------------------------------------------------------------------------
# Memory: the planner (--estimate_memory), and the estimate against what a run measures


def train_setup(s: Settings, world: int, cuda: bool = True) -> TrainSetup:
    sh = s.shared
    dtype = sh.runtime.dtype if sh.runtime.dtype != "auto" else ("bf16" if cuda else gt.auto_dtype(torch.device("cpu"))[0])
    return TrainSetup(batch_size=sh.batch.batch_size, dtype=dtype, optimizer=sh.optim.optimizer,
                      optimizer_config=sh.optimizer_config, activation_checkpointing=sh.model.activation_checkpointing,
                      world_size=world, fsdp=s.scale.fsdp, cpu_offload=s.scale.cpu_offload, cuda=cuda)


def estimate_memory(s: Settings) -> dict:
    """--estimate_memory: the plan for the given flags, printed; no data, no model, no training."""
    cfg = s.shared.model_config
    cuda = torch.cuda.is_available() and not s.shared.runtime.device.startswith(("cpu", "mps"))
    memory = (s.scale.gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 24)) * 2**30
    world = int(os.environ.get("WORLD_SIZE", "1")) if s.scale.fsdp else 1
    setup = train_setup(s, world, cuda=True)
    for line in memory_report(cfg, setup, memory):
        print(line)
    return {"plan": gt.memory_plan(cfg, setup), "largest_micro_batch": gt.largest_micro_batch(cfg, setup, memory)}


class MemoryCheck:
    """A log sink that prints, once, the planner's estimate next to the peak this run measured: on a
    GPU the peak allocated by tensors (what the plan counts) and the peak reserved by the allocator."""

    def __init__(self, estimate: float, device: torch.device):
        self.estimate, self.device, self.done = estimate, device, False

    def __call__(self, kind: str, metrics: dict) -> None:
        if self.done or kind != "train":
            return
        self.done = True
        if self.device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(self.device)
            what = f"allocated on the GPU; {torch.cuda.max_memory_reserved(self.device) / 2**30:.2f} GiB reserved"
        else:
            import resource

            measured, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
        print(f"memory: estimated {self.estimate / 2**30:.2f} GiB per device, measured {measured / 2**30:.2f} GiB "
              f"({what}) after step {metrics['step']}")


# ----------------------------------------------------------------------------------------------
# The steps of a run


def default_cache_dir(d: DataArgs) -> Path:
    """data/token_cache/<hash of what the cache holds> (not the seed: mixing is deterministic)."""
    tok = gt.get_tokenizer()
    own = [] if tok.name == "gpt2" and tok.folder is None else [gt.tokenizer_fingerprint()]  # GPT-2's: as always
    key = json.dumps([d.data, d.text_column, d.data_mix, d.cache_max_tokens, d.val_fraction, d.smollm_dir, *own])
    return Path("data/token_cache") / hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare_cache(d: DataArgs, runtime: gt.Runtime, progress: bool = True, sources: dict | None = None,
                  given: set[str] = frozenset()):
    """Rank 0 resolves the source and builds (or checks) the cache; every rank then maps it."""
    cache_dir = d.cache_dir or default_cache_dir(d)
    say = print if runtime.is_main else (lambda *a, **k: None)

    def build():
        data = d.data
        if data == "gutenberg":
            data = str(prepare_default_corpus()[0].parent)
        source = resolve_source(data, d.text_column, d.data_mix, d.smollm_dir, sources, given)
        token_cache.build_cache(source, cache_dir, max_tokens=int(d.cache_max_tokens) if d.cache_max_tokens else None,
                                val_fraction=d.val_fraction, shard_tokens=d.shard_tokens, progress=progress, log=say)
        return source

    source = gt.broadcast_from_main(runtime, build, wait_s=CACHE_WAIT_S)
    return cache_dir, token_cache.load_cache(cache_dir, source, verify=runtime.is_main)


@dataclass
class BatchPlan:
    grad_accum: int
    tokens_per_step: int
    max_steps: int = 0


def plan_batch(s: Settings, cfg: gt.GPTConfig, world: int) -> BatchPlan:
    """Gradient accumulation and tokens per step from the batch flags (checked before any work)."""
    grad_accum = s.shared.batch.grad_accum
    micro_tokens = s.shared.batch.batch_size * cfg.context_length * world
    total = s.budget.total_batch_tokens
    if total:
        if total % micro_tokens:
            raise gt.UserError(f"--total_batch_tokens {total} is not a multiple of batch_size x context_length x "
                               f"devices = {micro_tokens}; pick a multiple")
        grad_accum = total // micro_tokens
    return BatchPlan(grad_accum, micro_tokens * grad_accum)


def plan_steps(s: Settings, plan: BatchPlan, world: int, train_windows: int) -> BatchPlan:
    """The number of optimizer steps: --max_steps, or from --tokens_per_param or --train_tokens, or one
    epoch of the data."""
    if s.shared.batch.tokens_per_param:
        plan.max_steps = gt.steps_for_tokens_per_param(s.shared, plan.tokens_per_step)
    elif s.shared.batch.max_steps:
        plan.max_steps = s.shared.batch.max_steps
    elif s.budget.train_tokens:
        plan.max_steps = math.ceil(s.budget.train_tokens / plan.tokens_per_step)
    else:
        plan.max_steps = max(1, train_windows // (s.shared.batch.batch_size * plan.grad_accum * world))
    return plan


def build_model(s: Settings, cfg: gt.GPTConfig, runtime: gt.Runtime, say):
    """The (wrapped) model and its optimizer; the initial weights are the same on every rank."""
    sh = s.shared
    gt.seed_everything(sh.run.seed)
    model = new_model(cfg, sh.run.init_from, log=say)
    model = runtime.prepare(model)
    optimizer = build_optimizer(model, sh.optim, sh.optimizer_config, runtime.device)
    torch.manual_seed(sh.run.seed + runtime.rank)  # dropout differs across ranks; init above was shared
    return model, optimizer


def main(argv=None) -> dict:
    s = parse_args(argv)
    if s.scale.estimate_memory:
        return estimate_memory(s)
    if s.shared.run.check:
        return check(s)
    if int(os.environ.get("RANK", "0")) == 0:  # the others wait for rank 0 to claim the run folder
        inputs_ok(s)
    rank, world, local_rank = rt.setup_distributed(s.shared.runtime.device, s.scale.fsdp, s.scale.cpu_offload,
                                                   s.scale.dist_timeout_min)
    try:
        result = train(s, rank, world, local_rank)
    finally:
        rt.teardown_distributed()
    return result


def inputs_ok(s: Settings, probe: bool = False) -> None:
    """The device, the data source (resolved with its settings; with `probe` also opened and read a
    little), the model's size against the machine and the batch plan (--init_from's config was read
    with the settings), all read and planned, nothing allocated: what a run checks before it touches
    its run folder (a run does not probe: a complete cache of a hub source trains offline), and --check
    too. One line for the first wrong."""
    sh, d = s.shared, s.data
    device = gt.resolve_device(sh.runtime.device)
    if d.data != "gutenberg":
        source = resolve_source(d.data, d.text_column, d.data_mix, d.smollm_dir, s.sources, sh.given)
        if probe:
            source.probe()
    cfg = sh.model_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    setup = train_setup(s, world if s.scale.fsdp else 1, cuda=device.type == "cuda")
    memory, where = machine_memory(device.type), f"this machine's {device.type} memory"
    if s.scale.gpu_memory_gb and device.type == "cuda":
        memory = s.scale.gpu_memory_gb * 2**30
    if s.scale.cpu_offload:  # the whole state lives in the host's memory
        setup = dataclasses.replace(setup, cpu_offload=False, fsdp=False, world_size=1)
        memory, where = machine_memory("cpu"), "the host's memory"
    refuse_unfittable(cfg, setup, memory, where)
    plan_batch(s, cfg, world)


def check(s: Settings) -> dict:
    """--check: the data source, --init_from and the run folder, as the run would see them (in this one
    process, before any worker starts); no cache is built, nothing is trained or written."""
    sh, d = s.shared, s.data
    inputs_ok(s, probe=True)
    cfg = sh.model_config
    run_dir = sh.run.run_dir or gt.default_run_dir(SCRIPT, s.args, build_parser())
    what = (f"model {sh.model.model} ({gt.count_parameters_from_config(cfg)['total'] / 1e6:.1f}M parameters) | "
            f"data {d.data}")
    return gt.check_run(run_dir, cfg, sh.run.resume, sh.run.overwrite, optimizer_spec(sh.optim.optimizer).kind,
                        sh.model.pad_vocab, what, sh.plugins)


def train(s: Settings, rank: int, world: int, local_rank: int) -> dict:
    sh = s.shared
    runtime = gt.setup_runtime(sh.runtime.device, sh.runtime.dtype, sh.runtime.compile, rank, world, local_rank,
                               s.scale.fsdp, s.scale.cpu_offload)
    cfg = sh.model_config
    if s.data.prepare_only:
        cache_dir, cache = prepare_cache(s.data, runtime, sh.log.progress, s.sources, sh.given)
        return {"cache_dir": cache_dir, "manifest": cache.manifest}
    plan = plan_batch(s, cfg, world)
    run_dir = sh.run.run_dir or gt.default_run_dir(SCRIPT, s.args, build_parser())
    ckpt_bytes = gt.checkpoint_bytes(cfg, sh.optim.optimizer, sh.optimizer_config) // (world if s.scale.fsdp else 1)
    kind = optimizer_spec(sh.optim.optimizer).kind
    run = gt.open_run(runtime, run_dir, SCRIPT, gt.args_to_dict(s.args), sh.run.resume, sh.run.overwrite,
                      sh.run.keep_last, ckpt_bytes, sh.plugins,
                      accept=lambda ckpt: gt.check_resume(ckpt, cfg, kind, sh.model.pad_vocab))
    closers = []
    with gt.holding(run):
        try:
            cfg = dataclasses.replace(cfg, vocab_multiple=gt.vocab_multiple_for(sh.model.pad_vocab, runtime, run))
            return train_in(run, s, cfg, runtime, plan, closers)
        finally:
            for close in closers:
                with contextlib.suppress(Exception):
                    close()


def train_in(run: gt.RunFolder, s: Settings, cfg: gt.GPTConfig, runtime: gt.Runtime, plan: BatchPlan, closers: list) -> dict:
    sh = s.shared
    say = print if runtime.is_main else (lambda *a, **k: None)
    model, optimizer = build_model(s, cfg, runtime, say)  # before the cache: a bad --init_from fails fast
    cache_dir, cache = prepare_cache(s.data, runtime, sh.log.progress, s.sources, sh.given)
    train_data = gt.TokenWindowDataset(cache.train, cfg.context_length)
    val_data = gt.TokenWindowDataset(cache.val, cfg.context_length) if cache.val else None
    if val_data is not None and len(val_data) == 0:
        val_data = None
    plan = plan_steps(s, plan, runtime.world_size, len(train_data))
    say(f"model: {sh.model.label} {gt.count_parameters(gt.unwrap_model(model))['total'] / 1e6:.1f}M parameters | "
        f"{train_data.num_tokens():,} train tokens | {plan.tokens_per_step:,} tokens/step ({sh.batch.batch_size} x "
        f"{cfg.context_length} x {plan.grad_accum} accum x {runtime.world_size} devices) | {plan.max_steps} steps | "
        f"{runtime.device} {runtime.dtype} ({runtime.dtype_reason}){' compiled' if sh.runtime.compile else ''} | "
        f"{sh.optim.optimizer}, {sh.schedule.schedule} LR | run {run.run_id} in {run.dir}")
    sinks = start_run_sinks(s, run, cfg, runtime, plan, closers)
    spec = optimizer_spec(sh.optim.optimizer)
    sched_spec, schedule = resolve(sh.schedule, sh.optim.lr, plan.max_steps, sh.given, sh.schedule_config)
    tcfg = gt.train_config(sh, plan.max_steps, plan.grad_accum, s.sinks.histogram_every)
    result = gt.run_training(
        model, optimizer, runtime, tcfg, train_data, val_data, run, log_sinks=sinks,
        lr_fn=lr_function(sched_spec, schedule), optimizer_spec=spec,
        peak_flops=rt.peak_flops_for(runtime.device, s.scale.peak_tflops, warn=say),
        evaluations=tuple(evals.build(s.evals, runtime)),
        run_info={"script": SCRIPT, "args": gt.args_to_dict(s.args), "world_size": runtime.world_size,
                  "optimizer": spec.name, "dtype": runtime.dtype, "plugins": [p.record() for p in sh.plugins],
                  "schedule": {"name": sched_spec.name, **dataclasses.asdict(schedule)}})
    if runtime.world_size > 1 and not runtime.fsdp:  # (FSDP ranks hold different shards by design)
        result["weights_in_sync"] = rt.weights_in_sync(gt.unwrap_model(model), runtime.world_size)
        say(f"weights identical on all {runtime.world_size} ranks: {result['weights_in_sync']}")
    result.update(optimizer_state_bytes=measured_state_bytes(optimizer, spec), tokens_per_step=plan.tokens_per_step,
                  grad_accum=plan.grad_accum, max_steps=plan.max_steps, wandb_run_id=run.run_id, cache_dir=cache_dir)
    return result


def start_run_sinks(s: Settings, run: gt.RunFolder, cfg: gt.GPTConfig, runtime: gt.Runtime, plan: BatchPlan,
                    closers: list) -> list:
    """train.log, W&B, TensorBoard as asked, and the memory check (rank 0; none on the other ranks)."""
    if not runtime.is_main:
        return []
    header = {"args": gt.args_to_dict(s.args), "model_config": cfg.to_dict(), "versions": library_versions(),
              "git": git_hash(), "world_size": runtime.world_size, "grad_accum": plan.grad_accum, "run_id": run.run_id}
    sinks, more = start_sinks(s.sinks, run, header)
    closers.extend(more)
    setup = train_setup(s, runtime.world_size, cuda=runtime.device.type == "cuda")
    estimate = gt.memory_plan(cfg, dataclasses.replace(setup, dtype=runtime.dtype))["total"]
    return [*sinks, MemoryCheck(estimate, runtime.device)]


if __name__ == "__main__":
    gt.run_cli(main)
