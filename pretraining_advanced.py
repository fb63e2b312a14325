"""Pretrain a GPT at scale: the production path. The same training loop as pretraining_simple.py,
with features switched on by flags: smollm-corpus streaming and a pre-tokenized cache, cosine LR with
warmup, clipping, checkpoint/resume, W&B and TensorBoard, DDP via torchrun, bf16/fp16, SDPA attention,
torch.compile and GaLore.

    python pretraining_advanced.py --model debug --max_steps 200            # CPU smoke run, embedded books
    python pretraining_advanced.py --data smollm:cosmopedia-v2 --max_tokens 2e9 --prepare_only
    torchrun --standalone --nproc_per_node 8 pretraining_advanced.py --model 124M --data smollm:cosmopedia-v2 \\
        --max_tokens 2e9 --total_batch_tokens 524288 --compile --wandb
    python pretraining_advanced.py --run_dir runs/x --resume auto           # continue after preemption
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import gpt_train as gt
import token_cache
import wt_load

GALORE_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Peak dense bf16 tensor-core FLOP/s by GPU name, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}
VERSIONED_PACKAGES = ("torch", "numpy", "tiktoken", "datasets", "wandb", "galore-torch", "tensorboard", "transformers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    BOOL = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", default="gutenberg",
                   help="'gutenberg' (the embedded sample, cleaned by prep_dataset.py), smollm:SUBSET[,SUBSET] "
                        "(cosmopedia-v2, fineweb-edu-dedup), or local .txt/.jsonl/.json/.parquet file, folder or glob")
    g.add_argument("--text_column", default="text", help="column holding the text in json/parquet data")
    g.add_argument("--data_mix", default=None, help="weights of the smollm subsets, e.g. 0.7,0.3")
    g.add_argument("--max_tokens", type=float, default=None, help="cap on tokens taken from the source into the cache")
    g.add_argument("--val_fraction", type=float, default=0.01, help="share of the token stream held out for validation")
    g.add_argument("--cache_dir", type=Path, default=None,
                   help="token cache folder (default: data/token_cache/<hash of the source and settings>)")
    g.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per cache shard")
    g.add_argument("--prepare_only", action="store_true", help="build the token cache and exit")

    g = p.add_argument_group("run")
    g.add_argument("--run_dir", type=Path, default=Path("runs/advanced"),
                   help="checkpoints, log file, loss plot, W&B and TensorBoard files")
    g.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in --run_dir) or a checkpoint path")
    g.add_argument("--init_from", default=None,
                   help="start from weights only: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a HF GPT-2 dir or a checkpoint")
    g.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end / on a signal)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints kept in --run_dir (0: all)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (init, batch order, dropout)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="124M", help=f"preset: {', '.join(gt.PRESETS)} (or gpt2, gpt2-medium, ...)")
    for name, kind in (("n_layers", int), ("n_heads", int), ("emb_dim", int), ("context_length", int),
                       ("drop_rate", float)):
        g.add_argument(f"--{name}", type=kind, default=None, help=f"override the preset's {name}")
    g.add_argument("--qkv_bias", action=BOOL, default=None, help="bias in the q/k/v projection (preset default: on)")
    g.add_argument("--flash", action=BOOL, default=True,
                   help="SDPA attention (flash/memory-efficient kernels); --no-flash uses explicit masked softmax")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch per device")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--total_batch_tokens", type=int, default=None,
                   help="tokens per optimizer step across all devices; sets --grad_accum for the device count")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: from --train_tokens or 1 epoch)")
    g.add_argument("--train_tokens", type=float, default=None, help="training budget in tokens (sets --max_steps)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine (default: lr / 10)")
    g.add_argument("--warmup_steps", type=int, default=2000, help="linear warmup steps")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (2-D weights only)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw", help="AdamW, or GaLore-AdamW")
    g.add_argument("--galore_rank", type=int, default=128, help="GaLore projection rank")
    g.add_argument("--galore_update_proj_gap", type=int, default=200, help="steps between GaLore projector updates")
    g.add_argument("--galore_scale", type=float, default=0.25, help="GaLore update scale")
    g.add_argument("--galore_proj_type", default="std", choices=("std", "reverse_std", "left", "right", "full"),
                   help="GaLore projection type")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (auto: bf16 on a GPU that has it, else fp32)")
    g.add_argument("--compile", action=BOOL, default=False, help="torch.compile the model")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log_every", type=int, default=10, help="log line every N steps")
    g.add_argument("--eval_every", type=int, default=500, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    g.add_argument("--sample_every", type=int, default=1000, help="print a text sample every N steps (0: never)")
    g.add_argument("--sample_prompt", default="Every effort moves you", help="prompt for samples")
    g.add_argument("--max_bad_steps", type=int, default=3, help="stop after this many non-finite losses in a row")
    g.add_argument("--wandb", action=BOOL, default=False, help="log to Weights & Biases (offline without an API key)")
    g.add_argument("--wandb_project", default="gpt-pretraining", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name (default: the run dir's name)")
    g.add_argument("--tensorboard", action=BOOL, default=False, help="write TensorBoard event files")
    g.add_argument("--progress", action=BOOL, default=True, help="show a progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# Schedule


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ----------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return gt.make_adamw(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # galore-torch imports it; its CPU notice is noise
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:
        raise gt.UserError(f"--optimizer galore needs the galore-torch package ({e}); pip install -r requirements.txt")
    # GaLore projects the gradients of the attention and MLP matrices only; embeddings, LayerNorms and
    # biases keep plain AdamW state.
    galore, decay, no_decay = [], [], []
    for name, p in {n: p for n, p in model.named_parameters() if p.requires_grad}.items():
        if p.dim() == 2 and any(t in name for t in GALORE_TARGETS):
            galore.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": galore, "weight_decay": args.weight_decay, "rank": args.galore_rank,
         "update_proj_gap": args.galore_update_proj_gap, "scale": args.galore_scale, "proj_type": args.galore_proj_type},
    ]
    return GaLoreAdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), no_deprecation_warning=True)


PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type", "ortho_matrix")


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with GaLore projector objects turned into plain dicts, so the
    checkpoint loads with torch.load(weights_only=True)."""
    sd = optimizer.state_dict()
    state = {}
    for k, s in sd["state"].items():
        if "projector" in s:
            s = {**s, "projector": {f: getattr(s["projector"], f) for f in PROJECTOR_FIELDS}}
        state[k] = s
    return {**sd, "state": state}


def load_optimizer_state(optimizer, sd: dict) -> None:
    # Projector dicts are put back by hand: load_state_dict would mangle their strings (it casts
    # every iterable in the state).
    projectors = {k: s["projector"] for k, s in sd["state"].items() if isinstance(s.get("projector"), dict)}
    state = {k: {n: v for n, v in s.items() if n != "projector"} for k, s in sd["state"].items()}
    optimizer.load_state_dict({**sd, "state": state})
    if not projectors:
        return
    from galore_torch.galore_projector import GaLoreProjector

    params = [p for g in optimizer.param_groups for p in g["params"]]  # state dict keys index this list
    for k, d in projectors.items():
        proj = GaLoreProjector(d["rank"], update_proj_gap=d["update_proj_gap"], scale=d["scale"], proj_type=d["proj_type"])
        m = d["ortho_matrix"]
        proj.ortho_matrix = m.to(params[k].device) if torch.is_tensor(m) else m
        optimizer.state[params[k]]["projector"] = proj


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for s in optimizer.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# Distributed and logging


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; plain `python` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("FORCE_GLOO") != "1" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def peak_flops_for(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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
    """train.log in the run dir: a header with config, versions and git hash, then every log line."""

    def __init__(self, path: Path, header: dict):
        self.f = open(path, "a", buffering=1)
        self.f.write(f"# run started {time.strftime('%Y-%m-%d %H:%M:%S')}\n# {json.dumps(header, sort_keys=True)}\n")

    def __call__(self, metrics: dict, line: str | None) -> None:
        if line is None:
            line = "eval " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.f.write(line + "\n")

    def close(self):
        self.f.close()


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


def start_wandb(args, run_id: str):
    try:
        import wandb
    except ImportError:
        raise gt.UserError("--wandb needs the wandb package: pip install -r requirements.txt")
    run = wandb.init(project=args.wandb_project, name=args.wandb_run_name or args.run_dir.name, id=run_id,
                     resume="allow", dir=str(args.run_dir), config=gt.args_to_dict(args), mode=wandb_mode())

    def sink(metrics: dict, line: str | None) -> None:
        run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step" and v is not None},
                step=metrics["step"])
    return run, sink


def start_tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))

    def sink(metrics: dict, line: str | None) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("step", "max_steps") and v is not None:
                writer.add_scalar(f"train/{k}" if line else f"eval/{k}", v, metrics["step"])
    return writer, sink


def weights_in_sync(model: torch.nn.Module, world: int) -> bool:
    """Whether every rank ends with bit-identical weights (a hash per rank, compared on all)."""
    import torch.distributed as dist

    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    hashes = [None] * world
    dist.all_gather_object(hashes, h.hexdigest())
    return len(set(hashes)) == 1


# ----------------------------------------------------------------------------------------------
# Main


def default_cache_dir(args) -> Path:
    key = json.dumps([args.data, args.text_column, args.data_mix, args.max_tokens, args.val_fraction, args.seed])
    return Path("data/token_cache") / hashlib.sha256(key.encode()).hexdigest()[:12]


def resolve_data_arg(data: str) -> str:
    if data == "gutenberg":
        import prep_dataset

        files = prep_dataset.prepare_default_corpus()
        return str(files[0].parent)
    return data


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    rank, world, local_rank = setup_distributed()
    if world == 1:
        return train(args, rank, world, local_rank)
    import gc

    import torch.distributed as dist

    try:
        result = train(args, rank, world, local_rank)
        dist.barrier()  # no rank tears the group down while a peer still talks to it
        return result
    finally:
        gc.collect()  # DDP's reducer holds the process group: free it first, not during interpreter exit
        dist.destroy_process_group()


def train(args, rank: int, world: int, local_rank: int) -> dict:
    import torch.distributed as dist

    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    barrier = dist.barrier if world > 1 else None
    runtime = gt.setup_runtime(args.device, args.dtype, args.compile, rank, world, local_rank)
    cfg = gt.get_config(args.model, n_layers=args.n_layers, n_heads=args.n_heads, emb_dim=args.emb_dim,
                        context_length=args.context_length, drop_rate=args.drop_rate, qkv_bias=args.qkv_bias,
                        flash=args.flash)
    max_tokens = int(args.max_tokens) if args.max_tokens else None

    # Data: one rank builds the cache, all map it.
    data = resolve_data_arg(args.data) if is_main else None
    if world > 1:
        box = [data]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
    cache_dir = args.cache_dir or default_cache_dir(args)
    cache = token_cache.prepare_data(data, cache_dir, text_column=args.text_column, data_mix=args.data_mix,
                                     seed=args.seed, max_tokens=max_tokens, val_fraction=args.val_fraction,
                                     shard_tokens=args.shard_tokens, progress=args.progress and is_main,
                                     is_main=is_main, barrier=barrier, log=say)
    if args.prepare_only:
        return {"cache_dir": cache_dir, "manifest": cache.manifest}
    train_data = gt.TokenWindowDataset(cache.train, cfg.context_length)
    val_data = gt.TokenWindowDataset(cache.val, cfg.context_length) if cache.val else None
    if val_data is not None and len(val_data) == 0:
        val_data = None

    grad_accum = args.grad_accum
    micro_tokens = args.batch_size * cfg.context_length * world
    if args.total_batch_tokens:
        if args.total_batch_tokens % micro_tokens:
            raise gt.UserError(f"--total_batch_tokens {args.total_batch_tokens} is not a multiple of batch_size x "
                               f"context_length x devices = {micro_tokens}; pick a multiple")
        grad_accum = args.total_batch_tokens // micro_tokens
    tokens_per_step = micro_tokens * grad_accum
    if args.max_steps:
        max_steps = args.max_steps
    elif args.train_tokens:
        max_steps = math.ceil(args.train_tokens / tokens_per_step)
    else:
        max_steps = max(1, len(train_data) // (args.batch_size * grad_accum * world))  # one epoch
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10

    gt.seed_everything(args.seed)
    model = wt_load.new_model(cfg, args.init_from, log=say)
    counts = gt.count_parameters(model)
    say(f"model: {args.model} {counts['tied'] / 1e6:.1f}M parameters | {train_data.num_tokens():,} train tokens | "
        f"{tokens_per_step:,} tokens/step ({args.batch_size} x {cfg.context_length} x {grad_accum} accum x {world} "
        f"devices) | {max_steps} steps | {runtime.device} {runtime.dtype}{' compiled' if args.compile else ''}")
    model = runtime.prepare(model)
    optimizer = make_optimizer(gt.unwrap_model(model), args, runtime.device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if runtime.device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # dropout differs across ranks; init above was shared

    args.run_dir.mkdir(parents=True, exist_ok=True)
    sinks, closers = [], []
    run_id = {"wandb": None}
    if is_main:
        file_log = FileLog(args.run_dir / "train.log", {"args": gt.args_to_dict(args), "model_config": cfg.to_dict(),
                                                          "versions": library_versions(), "git": git_hash(),
                                                          "world_size": world, "grad_accum": grad_accum})
        sinks.append(file_log)
        closers.append(file_log.close)

    def on_resume(ckpt: dict):
        extra = ckpt.get("extra", {})
        if extra.get("optimizer") not in (None, args.optimizer):
            raise gt.CheckpointError(f"the checkpoint was trained with --optimizer {extra['optimizer']}; "
                                     f"resume with the same optimizer")
        run_id["wandb"] = extra.get("wandb_run_id")

    if args.resume:  # the W&B run id is needed before the run starts
        path = gt.CheckpointManager(args.run_dir).find(args.resume)
        if path is not None:
            run_id["wandb"] = gt.load_checkpoint(path, mmap=True).get("extra", {}).get("wandb_run_id")
    wandb_run = None
    if is_main and args.wandb:
        from wandb.sdk.lib.runid import generate_id

        run_id["wandb"] = run_id["wandb"] or generate_id()
        wandb_run, sink = start_wandb(args, run_id["wandb"])
        sinks.append(sink)
        closers.append(wandb_run.finish)
    if is_main and args.tensorboard:
        writer, sink = start_tensorboard(args.run_dir)
        sinks.append(sink)
        closers.append(writer.close)

    def extra_state() -> dict:
        return {"script": "pretraining_advanced", "args": gt.args_to_dict(args), "optimizer": args.optimizer,
                "wandb_run_id": run_id["wandb"], "world_size": world,
                "schedule": {"lr": args.lr, "min_lr": min_lr, "warmup_steps": args.warmup_steps, "max_steps": max_steps}}

    tcfg = gt.TrainConfig(max_steps=max_steps, grad_accum_steps=grad_accum, max_grad_norm=args.max_grad_norm,
                          log_every=args.log_every, eval_every=args.eval_every, sample_every=args.sample_every,
                          save_every=args.save_every, max_bad_steps=args.max_bad_steps,
                          progress=args.progress and is_main)
    try:
        result = gt.run_training(
            model, optimizer, runtime, tcfg, train_data, val_data, batch_size=args.batch_size, seed=args.seed,
            run_dir=args.run_dir, keep_last=args.keep_last, resume=args.resume,
            lr_fn=lambda s: cosine_lr(s, args.lr, min_lr, args.warmup_steps, max_steps),
            eval_iter=args.eval_iters, sample_prompt=args.sample_prompt, log_sinks=sinks, extra=extra_state,
            save_optimizer=lambda: optimizer_state(optimizer), load_optimizer=lambda sd: load_optimizer_state(optimizer, sd),
            peak_flops=peak_flops_for(runtime.device), on_resume=on_resume)
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
    if world > 1:
        result["weights_in_sync"] = weights_in_sync(gt.unwrap_model(model), world)
        say(f"weights identical on all {world} ranks: {result['weights_in_sync']}")
    result.update(optimizer_state_bytes=optimizer_state_bytes(optimizer), tokens_per_step=tokens_per_step,
                  grad_accum=grad_accum, max_steps=max_steps, wandb_run_id=run_id["wandb"], cache_dir=cache_dir)
    return result


if __name__ == "__main__":
    gt.run_cli(main)
