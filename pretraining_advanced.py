"""Pretrain a GPT at scale: the production path. The same training loop as pretraining_simple.py,
with features switched on by flags: smollm-corpus streaming and a pre-tokenized cache, cosine LR with
warmup, clipping, checkpoint/resume, W&B and TensorBoard, DDP via torchrun, bf16/fp16, SDPA attention,
torch.compile and GaLore.

    python pretraining_advanced.py --model debug --max_steps 200            # CPU smoke run, embedded books
    python pretraining_advanced.py --data smollm:cosmopedia-v2 --max_tokens 2e9 --prepare_only
    torchrun --standalone --nproc_per_node 8 pretraining_advanced.py --model 124M --data smollm:cosmopedia-v2 \\
        --max_tokens 2e9 --total_batch_tokens 524288 --compile --wandb --run_dir runs/gpt2
    python pretraining_advanced.py --run_dir runs/gpt2 --resume auto        # continue after preemption

Exit codes: 0 finished, 143 stopped by SIGTERM after saving (requeue with --resume auto), 130 Ctrl-C,
2 bad input, 1 any other failure.
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import gpt_train as gt
import token_cache
import wt_load

SCRIPT = "pretraining_advanced"
GALORE_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Peak dense bf16 tensor-core FLOP/s by GPU name, for MFU. The first name found in the device's name
# wins, so the H100's PCIe and NVL variants come before the SXM figure.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12, "H800": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
                   "V100": 125e12}
VERSIONED_PACKAGES = ("torch", "numpy", "tiktoken", "datasets", "wandb", "galore-torch", "tensorboard", "transformers")
CACHE_WAIT_S = 7 * 24 * 3600  # how long other ranks wait for rank 0's token cache build


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="gutenberg",
                   help="'gutenberg' (the embedded sample, cleaned by prep_dataset.py), smollm:SUBSET[,SUBSET] "
                        "(cosmopedia-v2, fineweb-edu-dedup), or local .txt/.jsonl/.json/.parquet file, folder or glob")
    g.add_argument("--text_column", default="text", help="column holding the text in json/parquet data")
    g.add_argument("--data_mix", default=None,
                   help="token weights of the parts of --data (smollm subsets, or comma-separated local files/folders/"
                        "globs), e.g. 0.7,0.3")
    g.add_argument("--smollm_dir", default=None,
                   help="read smollm:SUBSET,... from this local snapshot of the corpus (one folder per subset) "
                        "instead of the hub")
    g.add_argument("--max_tokens", type=float, default=None, help="cap on tokens taken from the source into the cache")
    g.add_argument("--val_fraction", type=float, default=0.01, help="share of the token stream held out for validation")
    g.add_argument("--cache_dir", type=Path, default=None,
                   help="token cache folder (default: data/token_cache/<hash of the source and settings>)")
    g.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per cache shard")
    g.add_argument("--prepare_only", action="store_true", help="build the token cache and exit")
    gt.add_shared_flags(p, model="124M", batch_size=32, seed=1337, eval_every=500, eval_iters=20, sample_every=1000,
                        save_every=1000, log_every=10)

    g = p.add_argument_group("model overrides")
    for name in ("n_layers", "n_heads", "emb_dim"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    g.add_argument("--qkv_bias", action=argparse.BooleanOptionalAction, default=None,
                   help="bias in the q/k/v projection (preset default: on)")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--total_batch_tokens", type=int, default=None,
                   help="tokens per optimizer step across all devices; sets --grad_accum for the device count")
    g.add_argument("--train_tokens", type=float, default=None, help="training budget in tokens (sets --max_steps)")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine (default: lr / 10)")
    g.add_argument("--warmup_steps", type=int, default=2000, help="linear warmup steps")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw", help="AdamW, or GaLore-AdamW")
    g.add_argument("--galore_rank", type=int, default=128, help="GaLore projection rank")
    g.add_argument("--galore_update_proj_gap", type=int, default=200, help="steps between GaLore projector updates")
    g.add_argument("--galore_scale", type=float, default=0.25, help="GaLore update scale")
    g.add_argument("--galore_proj_type", default="std", choices=("std", "reverse_std", "left", "right", "full"),
                   help="GaLore projection type")

    g = p.add_argument_group("log sinks and distributed")
    g.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                   help="log to Weights & Biases (offline without an API key)")
    g.add_argument("--wandb_project", default="gpt-pretraining", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name (default: the run folder's name)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="write TensorBoard event files")
    g.add_argument("--histogram_every", type=int, default=0,
                   help="parameter and gradient histograms to W&B and TensorBoard every N steps (0: never)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard parameters, gradients and optimizer state over the torchrun processes (FSDP2) instead "
                        "of keeping a whole copy on each (DDP): for models that do not fit one device")
    g.add_argument("--cpu_offload", action=argparse.BooleanOptionalAction, default=False,
                   help="with --fsdp: keep parameters, gradients and optimizer state in host memory, on the GPU only "
                        "while a block computes (the largest preset on one GPU)")
    g.add_argument("--estimate_memory", action="store_true",
                   help="print what training would need per device (parameters, gradients, optimizer, activations, "
                        "logits), whether it fits and what would make it fit; then exit without training")
    g.add_argument("--gpu_memory_gb", type=float, default=None,
                   help="device memory the estimate is held against (default: the GPU's, or 24)")
    g.add_argument("--dist_timeout_min", type=float, default=30.0,
                   help="timeout of each collective under torchrun, in minutes (a token cache build on rank 0 is "
                        "waited for outside collectives, however long it takes)")
    return p


RULES = [
    ("val_fraction", lambda v: gt.finite(v) and 0 < v < 1, "between 0 and 1"),
    ("max_tokens", lambda v: gt.finite(v) and v >= 1, "a number of tokens >= 1"),
    ("shard_tokens", lambda v: v >= 4096, "at least 4096"),
    ("total_batch_tokens", lambda v: v >= 1, "at least 1"),
    ("train_tokens", lambda v: gt.finite(v) and v >= 1, "a number of tokens >= 1"),
    ("min_lr", lambda v: gt.finite(v) and v >= 0, "a finite number >= 0"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("beta1", lambda v: gt.finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("beta2", lambda v: gt.finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("galore_rank", lambda v: v >= 1, "at least 1"),
    ("galore_update_proj_gap", lambda v: v >= 1, "at least 1"),
    ("galore_scale", lambda v: gt.finite(v) and v > 0, "a finite number > 0"),
    ("n_layers", lambda v: v >= 1, "at least 1"),
    ("n_heads", lambda v: v >= 1, "at least 1"),
    ("emb_dim", lambda v: v >= 1, "at least 1"),
    ("dist_timeout_min", lambda v: gt.finite(v) and v > 0, "a number of minutes > 0"),
    ("histogram_every", lambda v: v >= 0, ">= 0"),
    ("gpu_memory_gb", lambda v: gt.finite(v) and v > 0, "a number of GB > 0"),
]


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    gt.check_flags(args, RULES)
    if args.min_lr is not None and args.min_lr > args.lr:
        raise gt.UserError(f"--min_lr {args.min_lr} is above --lr {args.lr}; the cosine decays from --lr down to --min_lr")
    if args.fsdp and args.optimizer == "galore":
        raise gt.UserError("--optimizer galore cannot run on sharded parameters (it projects whole matrices); use "
                           "--fsdp with adamw, or GaLore with --activation_checkpointing and bf16 on one GPU")
    if args.cpu_offload and not args.fsdp:
        raise gt.UserError("--cpu_offload offloads FSDP's shards: add --fsdp (under torchrun, --nproc_per_node 1 for "
                           "one GPU)")
    if args.fsdp and "WORLD_SIZE" not in os.environ and not args.estimate_memory:
        raise gt.UserError("--fsdp shards over the processes torchrun starts: run it as torchrun --nproc_per_node N "
                           "pretraining_advanced.py --fsdp ... (N=1 with --cpu_offload for one GPU)")
    return args


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
    for name, p in {n: p for n, p in gt.unwrap_model(model).named_parameters() if p.requires_grad}.items():
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
# Distributed


def setup_distributed(args) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; plain `python` is rank 0 of 1.
    NCCL when the run is on GPUs, gloo when --device cpu (or no GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not (args.fsdp and "WORLD_SIZE" in os.environ):  # FSDP needs a group, even of one
        return 0, 1, 0
    from datetime import timedelta

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available() and not args.device.startswith(("cpu", "mps"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=args.dist_timeout_min))
    return dist.get_rank(), dist.get_world_size(), local_rank


def peak_flops_for(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


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
# Log sinks: each is called as sink(kind, metrics) with kind "train" or "eval", on rank 0


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
    """train.log in the run folder: a header with config, versions and git hash, then every log line."""

    def __init__(self, path: Path, header: dict):
        self.f = open(path, "a", buffering=1)
        self.f.write(f"# run started {time.strftime('%Y-%m-%d %H:%M:%S')}\n# {json.dumps(header, sort_keys=True)}\n")

    def __call__(self, kind: str, metrics: dict) -> None:
        if kind == "train":
            self.f.write(gt.format_log_line(metrics) + "\n")
        elif kind == "eval":
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


def wandb_logged_through(run: gt.RunFolder) -> int:
    """The last step that earlier processes of this run saved in their local W&B files (offline-run-*
    and run-* folders keep every record sent). 0 when none can be read: then everything after the
    checkpoint is logged again."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        return 0
    last = 0
    for path in (run.dir / "wandb").glob(f"*-{run.run_id}/*.wandb"):
        for payload in wandb_records(path.read_bytes()):
            record = pb.Record()
            if _parses(record, payload) and record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
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


def start_wandb(args, run: gt.RunFolder, config: dict):
    """The W&B run with the run folder's id, resumed if it exists. Steps that an earlier process of
    this run already saved to W&B are not logged again (the resumed run recomputes them bit for bit):
    each step is logged once, so offline runs synced later do not clash. Steps a killed process had
    not yet handed to W&B's files are logged by the resumed run."""
    try:
        import wandb
    except ImportError:
        raise gt.UserError("--wandb needs the wandb package: pip install -r requirements.txt")
    already = wandb_logged_through(run)
    wb = wandb.init(project=args.wandb_project, name=args.wandb_run_name or run.dir.name, id=run.run_id,
                    resume="allow", dir=str(run.dir), config=config, mode=wandb_mode())

    def sink(kind: str, metrics: dict) -> None:
        if metrics["step"] <= already:
            return
        if kind == "histograms":
            values = {k: wandb.Histogram(v.numpy()) for k, v in metrics.items() if k != "step"}
        else:
            values = dict(metric_items(kind, metrics))
        wb.log(values, step=metrics["step"])
    return wb, sink


def start_tensorboard(run: gt.RunFolder, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # A resumed run re-logs the steps after its checkpoint: purge what a killed run logged past it.
    writer = SummaryWriter(str(run.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def sink(kind: str, metrics: dict) -> None:
        if kind == "histograms":
            for name, v in metrics.items():
                if name != "step":
                    writer.add_histogram(name, v, metrics["step"])
            return
        for name, v in metric_items(kind, metrics):
            writer.add_scalar(name, v, metrics["step"])
    return writer, sink


def start_sinks(args, run: gt.RunFolder, header: dict) -> tuple[list, list]:
    """The log sinks this run asked for, and how to close each (rank 0 only)."""
    start_step = run.resume_point.checkpoint["step"] if run.resume_point else 0
    file_log = FileLog(run.dir / "train.log", header)
    sinks, closers = [file_log], [file_log.close]
    if args.wandb:
        wb, sink = start_wandb(args, run, header)
        sinks.append(sink)
        closers.append(wb.finish)
    if args.tensorboard:
        writer, sink = start_tensorboard(run, start_step)
        sinks.append(sink)
        closers.append(writer.close)
    return sinks, closers


# ----------------------------------------------------------------------------------------------
# Memory: the planner (--estimate_memory), and the estimate against what a run measures


def train_setup(args, cfg: gt.GPTConfig, world: int, cuda: bool = True) -> gt.TrainSetup:
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else gt.auto_dtype(torch.device("cpu"))[0])
    return gt.TrainSetup(batch_size=args.batch_size, dtype=dtype, optimizer=args.optimizer, galore_rank=args.galore_rank,
                         activation_checkpointing=args.activation_checkpointing, world_size=world, fsdp=args.fsdp,
                         cpu_offload=args.cpu_offload, cuda=cuda)


# Changes to try when a plan does not fit, cheapest first: precision, recomputation, a smaller
# optimizer state, then sharding over more GPUs, then the host's memory.
FIT_OPTIONS = [
    ("--dtype bf16", {"dtype": "bf16"}),
    ("--activation_checkpointing", {"activation_checkpointing": True}),
    ("--dtype bf16 --activation_checkpointing", {"dtype": "bf16", "activation_checkpointing": True}),
    ("--optimizer galore --dtype bf16 --activation_checkpointing",
     {"optimizer": "galore", "dtype": "bf16", "activation_checkpointing": True}),
    *[(f"--fsdp over {n} GPUs --dtype bf16", {"fsdp": True, "world_size": n, "dtype": "bf16"}) for n in (2, 4, 8)],
    *[(f"--fsdp over {n} GPUs --dtype bf16 --activation_checkpointing",
       {"fsdp": True, "world_size": n, "dtype": "bf16", "activation_checkpointing": True}) for n in (2, 4, 8)],
    ("--fsdp --cpu_offload --dtype bf16 --activation_checkpointing (1 GPU)",
     {"fsdp": True, "cpu_offload": True, "world_size": 1, "dtype": "bf16", "activation_checkpointing": True}),
]


def cheapest_fit(cfg: gt.GPTConfig, setup: gt.TrainSetup, memory: float) -> tuple[str, int] | None:
    """The first of FIT_OPTIONS (not already in use, not undoing a choice) that fits, and its largest micro-batch."""
    for flags, change in FIT_OPTIONS:
        if change.get("optimizer") == "galore" and setup.fsdp:
            continue
        candidate = dataclasses.replace(setup, **change)
        if candidate == setup or (setup.fsdp and not candidate.fsdp) or candidate.world_size < setup.world_size:
            continue
        batch = gt.largest_micro_batch(cfg, candidate, memory)
        if batch >= 1:
            return flags, batch
    return None


def memory_report(cfg: gt.GPTConfig, setup: gt.TrainSetup, memory: float) -> list[str]:
    """The plan in one screen: every part per device, the total against `memory`, the largest
    micro-batch, and if it does not fit the cheapest flags that make it fit."""
    plan = gt.memory_plan(cfg, setup)
    gib = lambda b: f"{b / 2**30:7.2f} GiB"  # noqa: E731
    ckpt_plan = gt.memory_plan(cfg, dataclasses.replace(setup, activation_checkpointing=not setup.activation_checkpointing))
    lines = [f"memory per device: {gt.count_parameters_from_config(cfg)['tied'] / 1e6:.0f}M parameters, micro-batch "
             f"{setup.batch_size} x {cfg.context_length}, {setup.dtype}, {setup.optimizer}"
             f"{', FSDP over ' + str(setup.world_size) if setup.fsdp else ''}{', CPU offload' if setup.cpu_offload else ''}"]
    for part in ("parameters", "gradients", "optimizer", "gathered blocks", "activations", "logits and loss", "margin"):
        if part == "gathered blocks" and not setup.fsdp:
            continue
        extra = ""
        if part == "activations":
            extra = (f"   ({'without' if setup.activation_checkpointing else 'with'} activation checkpointing: "
                     f"{ckpt_plan['activations'] / 2**30:.2f} GiB)")
        lines.append(f"  {part:<17}{gib(plan[part])}{extra}")
    fits = plan["total"] <= memory
    largest = gt.largest_micro_batch(cfg, setup, memory)
    lines.append(f"  {'total':<17}{gib(plan['total'])}  of {memory / 2**30:.0f} GiB: {'fits' if fits else 'does NOT fit'}; "
                 f"largest micro-batch that fits: {largest or 'none'}")
    if not fits:
        fix = cheapest_fit(cfg, setup, memory)
        lines.append(f"  cheapest change that fits: {fix[0]} (micro-batch up to {fix[1]}; raise --grad_accum to keep the "
                     f"tokens per step)" if fix else "  nothing here makes it fit: use more GPUs or a smaller --model")
    return lines


def estimate_memory(args) -> dict:
    """--estimate_memory: the plan for the given flags, printed; no data, no model, no training."""
    cfg = model_config(args)
    cuda = torch.cuda.is_available() and not args.device.startswith(("cpu", "mps"))
    memory = (args.gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 24)) * 2**30
    world = int(os.environ.get("WORLD_SIZE", "1")) if args.fsdp else 1
    setup = train_setup(args, cfg, world, cuda=True)
    for line in memory_report(cfg, setup, memory):
        print(line)
    return {"plan": gt.memory_plan(cfg, setup), "largest_micro_batch": gt.largest_micro_batch(cfg, setup, memory)}


class MemoryCheck:
    """A log sink that prints, once, the planner's estimate next to the peak this run measured."""

    def __init__(self, estimate: float, device: torch.device):
        self.estimate, self.device, self.done = estimate, device, False

    def __call__(self, kind: str, metrics: dict) -> None:
        if self.done or kind != "train":
            return
        self.done = True
        if self.device.type == "cuda":
            measured, what = torch.cuda.max_memory_allocated(self.device), "allocated on the GPU"
        else:
            import resource

            measured, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
        print(f"memory: estimated {self.estimate / 2**30:.2f} GiB per device, measured {measured / 2**30:.2f} GiB "
              f"({what}) after step {metrics['step']}")


# ----------------------------------------------------------------------------------------------
# The steps of a run


def model_config(args) -> gt.GPTConfig:
    return gt.get_config(args.model, n_layers=args.n_layers, n_heads=args.n_heads, emb_dim=args.emb_dim,
                         context_length=args.context_length, drop_rate=args.drop_rate, qkv_bias=args.qkv_bias,
                         flash=args.flash, activation_checkpointing=args.activation_checkpointing)


def default_cache_dir(args) -> Path:
    key = json.dumps([args.data, args.text_column, args.data_mix, args.max_tokens, args.val_fraction, args.seed,
                      args.smollm_dir])
    return Path("data/token_cache") / hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare_cache(args, runtime: gt.Runtime) -> tuple[Path, token_cache.TokenCache]:
    """Rank 0 resolves the source and builds (or checks) the cache; every rank then maps it."""
    cache_dir = args.cache_dir or default_cache_dir(args)
    say = print if runtime.is_main else (lambda *a, **k: None)

    def build():
        data = args.data
        if data == "gutenberg":
            import prep_dataset

            data = str(prep_dataset.prepare_default_corpus()[0].parent)
        source = token_cache.resolve_source(data, args.text_column, args.data_mix, args.seed, args.smollm_dir)
        token_cache.build_cache(source, cache_dir, max_tokens=int(args.max_tokens) if args.max_tokens else None,
                                val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                                progress=args.progress, log=say)
        return source

    source = gt.broadcast_from_main(runtime, build, wait_s=CACHE_WAIT_S)
    return cache_dir, token_cache.load_cache(cache_dir, source, verify=runtime.is_main)


@dataclass
class BatchPlan:
    grad_accum: int
    tokens_per_step: int
    max_steps: int = 0
    min_lr: float = 0.0


def plan_batch(args, cfg: gt.GPTConfig, world: int) -> BatchPlan:
    """Gradient accumulation and tokens per step from the batch flags (checked before any work)."""
    grad_accum = args.grad_accum
    micro_tokens = args.batch_size * cfg.context_length * world
    if args.total_batch_tokens:
        if args.total_batch_tokens % micro_tokens:
            raise gt.UserError(f"--total_batch_tokens {args.total_batch_tokens} is not a multiple of batch_size x "
                               f"context_length x devices = {micro_tokens}; pick a multiple")
        grad_accum = args.total_batch_tokens // micro_tokens
    return BatchPlan(grad_accum, micro_tokens * grad_accum, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10)


def plan_steps(args, plan: BatchPlan, world: int, train_windows: int) -> BatchPlan:
    """The number of optimizer steps: --max_steps, or from --train_tokens, or one epoch of the data."""
    if args.max_steps:
        plan.max_steps = args.max_steps
    elif args.train_tokens:
        plan.max_steps = math.ceil(args.train_tokens / plan.tokens_per_step)
    else:
        plan.max_steps = max(1, train_windows // (args.batch_size * plan.grad_accum * world))
    return plan


def build_model(args, cfg: gt.GPTConfig, runtime: gt.Runtime, say) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The (wrapped) model and its optimizer; the initial weights are the same on every rank."""
    gt.seed_everything(args.seed)
    model = wt_load.new_model(cfg, args.init_from, log=say)
    model = runtime.prepare(model)
    optimizer = make_optimizer(model, args, runtime.device)
    torch.manual_seed(args.seed + runtime.rank)  # dropout differs across ranks; init above was shared
    return model, optimizer


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.estimate_memory:
        return estimate_memory(args)
    rank, world, local_rank = setup_distributed(args)
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return train(args, rank, world, local_rank)

    try:
        result = train(args, rank, world, local_rank)
        dist.barrier()  # no rank tears the group down while a peer still talks to it
        return result
    finally:
        gc.collect()  # DDP's reducer holds the process group: free it first, not during interpreter exit
        dist.destroy_process_group()


def train(args, rank: int, world: int, local_rank: int) -> dict:
    runtime = gt.setup_runtime(args.device, args.dtype, args.compile, rank, world, local_rank, args.fsdp,
                               args.cpu_offload)
    cfg = model_config(args)
    if args.prepare_only:
        cache_dir, cache = prepare_cache(args, runtime)
        return {"cache_dir": cache_dir, "manifest": cache.manifest}
    plan = plan_batch(args, cfg, world)
    run_dir = args.run_dir or gt.default_run_dir(SCRIPT, args)
    run = gt.open_run(runtime, run_dir, SCRIPT, gt.args_to_dict(args), args.resume, args.overwrite, args.keep_last,
                      gt.checkpoint_bytes(cfg) // (world if args.fsdp else 1))
    closers = []
    try:
        cfg = dataclasses.replace(cfg, vocab_multiple=gt.vocab_multiple_for(args.pad_vocab, runtime, run))
        return train_in(run, args, cfg, runtime, plan, closers)
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        run.release()


def train_in(run: gt.RunFolder, args, cfg: gt.GPTConfig, runtime: gt.Runtime, plan: BatchPlan, closers: list) -> dict:
    say = print if runtime.is_main else (lambda *a, **k: None)
    model, optimizer = build_model(args, cfg, runtime, say)  # before the cache: a bad --init_from fails fast
    cache_dir, cache = prepare_cache(args, runtime)
    train_data = gt.TokenWindowDataset(cache.train, cfg.context_length)
    val_data = gt.TokenWindowDataset(cache.val, cfg.context_length) if cache.val else None
    if val_data is not None and len(val_data) == 0:
        val_data = None
    plan = plan_steps(args, plan, runtime.world_size, len(train_data))
    counts = gt.count_parameters(gt.unwrap_model(model))
    say(f"model: {args.model} {counts['tied'] / 1e6:.1f}M parameters | {train_data.num_tokens():,} train tokens | "
        f"{plan.tokens_per_step:,} tokens/step ({args.batch_size} x {cfg.context_length} x {plan.grad_accum} accum x "
        f"{runtime.world_size} devices) | {plan.max_steps} steps | {runtime.device} {runtime.dtype} "
        f"({runtime.dtype_reason}){' compiled' if args.compile else ''} | run {run.run_id} in {run.dir}")
    setup = train_setup(args, cfg, runtime.world_size, cuda=runtime.device.type == "cuda")
    estimate = gt.memory_plan(cfg, dataclasses.replace(setup, dtype=runtime.dtype))["total"]
    sinks = []
    if runtime.is_main:
        header = {"args": gt.args_to_dict(args), "model_config": cfg.to_dict(), "versions": library_versions(),
                  "git": git_hash(), "world_size": runtime.world_size, "grad_accum": plan.grad_accum,
                  "run_id": run.run_id}
        sinks, more = start_sinks(args, run, header)
        closers.extend(more)
        sinks.append(MemoryCheck(estimate, runtime.device))
    tcfg = gt.train_config(args, plan.max_steps, plan.grad_accum)
    result = gt.run_training(
        model, optimizer, runtime, tcfg, train_data, val_data, run, log_sinks=sinks,
        lr_fn=lambda s: cosine_lr(s, args.lr, plan.min_lr, args.warmup_steps, plan.max_steps),
        peak_flops=peak_flops_for(runtime.device),
        run_info={"script": SCRIPT, "args": gt.args_to_dict(args), "world_size": runtime.world_size,
                  "schedule": {"lr": args.lr, "min_lr": plan.min_lr, "warmup_steps": args.warmup_steps,
                               "max_steps": plan.max_steps}})
    if runtime.world_size > 1 and not runtime.fsdp:  # (FSDP ranks hold different shards by design)
        result["weights_in_sync"] = weights_in_sync(gt.unwrap_model(model), runtime.world_size)
        say(f"weights identical on all {runtime.world_size} ranks: {result['weights_in_sync']}")
    result.update(optimizer_state_bytes=optimizer_state_bytes(optimizer), tokens_per_step=plan.tokens_per_step,
                  grad_accum=plan.grad_accum, max_steps=plan.max_steps, wandb_run_id=run.run_id, cache_dir=cache_dir)
    return result


if __name__ == "__main__":
    gt.run_cli(main)
