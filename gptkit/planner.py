"""The memory planner: what training a config takes per device, as arithmetic before any allocation
(and without a GPU): parameters, gradients, optimizer state (from the optimizer's spec), activations,
logits and a margin, whether it fits, the largest micro-batch that does, and the cheapest change of
flags that makes it fit. Behind `--estimate_memory`; a real run prints it next to the measured peak."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gptkit.attention import DTYPE_BYTES, attention_spec
from gptkit.errors import UserError
from gptkit.model import GPTConfig, count_parameters_from_config, parameter_shapes
from gptkit.optim import OPTIMIZERS, optimizer_spec


@dataclass
class TrainSetup:
    """How a config is trained, as far as memory goes."""
    batch_size: int = 8  # sequences per micro-batch per device
    dtype: str = "bf16"  # autocast / FSDP compute precision
    optimizer: str = "adamw"  # a registered optimizer
    optimizer_config: object = None  # its own settings (None: its defaults)
    activation_checkpointing: bool = False
    world_size: int = 1  # devices the model is sharded over (FSDP); 1 = every device holds everything
    fsdp: bool = False
    cpu_offload: bool = False
    cuda: bool = True  # count the CUDA context in the margin


def optimizer_state_bytes_of(cfg: GPTConfig, optimizer: str = "adamw", config=None) -> int:
    """Bytes of optimizer state after the first step, from the optimizer's spec."""
    spec = optimizer_spec(optimizer)
    if config is None and spec.config is not None:
        config = spec.config()
    return spec.state_bytes(parameter_shapes(cfg), config)


def checkpoint_bytes(cfg: GPTConfig, optimizer: str = "adamw", config=None) -> int:
    """About how big a checkpoint of this model is: fp32 weights plus the optimizer's state."""
    return 4 * count_parameters_from_config(cfg)["total"] + optimizer_state_bytes_of(cfg, optimizer, config)


def activation_bytes_per_token(cfg: GPTConfig, dtype: str, checkpointing: bool) -> float:
    """Bytes the backward pass keeps per token. Per block without checkpointing: its input, both norms'
    outputs, the attention output and its projection's input, the residual after attention (6 x emb_dim
    floats), q/k/v (fewer with grouped key/value heads), and the MLP's own (its spec says: 8 x emb_dim
    for a 4x MLP, before and after the activation). In fp32 4 bytes each (GPT-2: 68 x emb_dim bytes);
    autocast keeps the matmul inputs in 16 bits, about 38/68 of that. The attention adds its own (its
    spec's extra_activation_bytes: the (T x T) probabilities per head for the explicit softmax).
    With checkpointing only each block's input is kept, plus one block's worth while it is recomputed."""
    from gptkit.parts import MLPS

    h = cfg.emb_dim
    floats = 6 * h + (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + MLPS.spec(cfg.mlp).activation_floats(cfg)
    per_block = floats * (4 if dtype == "fp32" else 38 / 17) + attention_spec(cfg.attention).extra_activation_bytes(
        cfg, dtype)
    if checkpointing:
        return cfg.n_layers * 4 * h + per_block + 16 * h
    return cfg.n_layers * per_block + 16 * h  # + embeddings and the final norm


def logits_bytes_per_token(cfg: GPTConfig, dtype: str) -> int:
    """The head's output and the loss: the logits, their fp32 copy or log-probabilities, and the
    gradient written over them (fp32), per token."""
    return cfg.padded_vocab_size * (12 if dtype == "fp32" else 14)


def memory_plan(cfg: GPTConfig, setup: TrainSetup) -> dict[str, float]:
    """Bytes per device for training `cfg` as `setup` says: parameters, gradients, optimizer state
    (sharded over world_size with FSDP, on the host with CPU offload), activations and the logits for
    one micro-batch, and a margin (10% plus the CUDA context)."""
    shapes = parameter_shapes(cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    shard = setup.world_size if setup.fsdp else 1
    on_device = 0.0 if setup.cpu_offload else 1.0
    largest_block = sum(math.prod(s) for n, s in shapes.items() if n.startswith("h.0."))
    plan = {
        "parameters": on_device * 4 * n_params / shard,
        "gradients": on_device * 4 * n_params / shard,
        "optimizer": on_device * optimizer_state_bytes_of(cfg, setup.optimizer, setup.optimizer_config) / shard,
        # FSDP gathers a block's full parameters to compute it (and the next one, prefetched).
        "gathered blocks": (2 * largest_block * DTYPE_BYTES[setup.dtype]) if setup.fsdp else 0.0,
        "activations": setup.batch_size * cfg.context_length * activation_bytes_per_token(
            cfg, setup.dtype, setup.activation_checkpointing),
        "logits and loss": setup.batch_size * cfg.context_length * logits_bytes_per_token(cfg, setup.dtype),
    }
    subtotal = sum(plan.values())
    plan["margin"] = 0.1 * subtotal + (0.5 * 2**30 if setup.cuda else 0.0)
    plan["total"] = subtotal + plan["margin"]
    return plan


def largest_micro_batch(cfg: GPTConfig, setup: TrainSetup, memory_bytes: float) -> int:
    """The largest per-device micro-batch whose plan fits in `memory_bytes` (0 if none does)."""
    fits = lambda b: memory_plan(cfg, dataclasses.replace(setup, batch_size=b))["total"] <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_options() -> list[tuple[str, dict]]:
    """Changes to try when a plan does not fit, cheapest first: precision, recomputation, an optimizer
    whose spec says it saves memory, then sharding over more GPUs, then the host's memory."""
    opts = [("--dtype bf16", {"dtype": "bf16"}),
            ("--activation_checkpointing", {"activation_checkpointing": True}),
            ("--dtype bf16 --activation_checkpointing", {"dtype": "bf16", "activation_checkpointing": True})]
    opts += [(f"--optimizer {name} --dtype bf16 --activation_checkpointing",
              {"optimizer": name, "optimizer_config": None, "dtype": "bf16", "activation_checkpointing": True})
             for name, spec in OPTIMIZERS.items() if spec.saves_memory]
    opts += [(f"--fsdp over {n} GPUs --dtype bf16", {"fsdp": True, "world_size": n, "dtype": "bf16"}) for n in (2, 4, 8)]
    opts += [(f"--fsdp over {n} GPUs --dtype bf16 --activation_checkpointing",
              {"fsdp": True, "world_size": n, "dtype": "bf16", "activation_checkpointing": True}) for n in (2, 4, 8)]
    opts += [("--fsdp --cpu_offload --dtype bf16 --activation_checkpointing (1 GPU)",
              {"fsdp": True, "cpu_offload": True, "world_size": 1, "dtype": "bf16", "activation_checkpointing": True})]
    return opts


def cheapest_fit(cfg: GPTConfig, setup: TrainSetup, memory: float) -> tuple[str, int] | None:
    """The first of fit_options() (not already in use, not undoing a choice, not an optimizer that
    cannot run sharded under FSDP) that fits, and its largest micro-batch."""
    for flags, change in fit_options():
        candidate = dataclasses.replace(setup, **change)
        if candidate.fsdp and optimizer_spec(candidate.optimizer).fsdp is not None:
            continue
        if candidate == setup or (setup.fsdp and not candidate.fsdp) or candidate.world_size < setup.world_size:
            continue
        batch = largest_micro_batch(cfg, candidate, memory)
        if batch >= 1:
            return flags, batch
    return None


def memory_report(cfg: GPTConfig, setup: TrainSetup, memory: float) -> list[str]:
    """The plan in one screen: every part per device, the total against `memory`, the largest
    micro-batch, and if it does not fit the cheapest flags that make it fit."""
    plan = memory_plan(cfg, setup)
    gib = lambda b: f"{b / 2**30:7.2f} GiB"  # noqa: E731
    ckpt_plan = memory_plan(cfg, dataclasses.replace(setup, activation_checkpointing=not setup.activation_checkpointing))
    lines = [f"memory per device: {count_parameters_from_config(cfg)['total'] / 1e6:.0f}M parameters, micro-batch "
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
    largest = largest_micro_batch(cfg, setup, memory)
    lines.append(f"  {'total':<17}{gib(plan['total'])}  of {memory / 2**30:.0f} GiB: {'fits' if fits else 'does NOT fit'}; "
                 f"largest micro-batch that fits: {largest or 'none'}")
    if not fits:
        fix = cheapest_fit(cfg, setup, memory)
        lines.append(f"  cheapest change that fits: {fix[0]} (micro-batch up to {fix[1]}; raise --grad_accum to keep the "
                     f"tokens per step)" if fix else "  nothing here makes it fit: use more GPUs or a smaller --model")
    return lines


def machine_memory(device_type: str = "cpu") -> float:
    """Bytes a run on this device can have: the GPU's memory, or the host's total RAM."""
    if device_type == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def refuse_unfittable(cfg: GPTConfig, setup: TrainSetup, memory: float, where: str) -> None:
    """One error line, before anything is allocated, for a model whose weights, gradients and optimizer
    state alone (no batch at all) exceed `memory`: no micro-batch, precision or recomputation helps."""
    plan = memory_plan(cfg, setup)
    state = plan["parameters"] + plan["gradients"] + plan["optimizer"]
    if state > memory:
        params = count_parameters_from_config(cfg)["total"]
        raise UserError(f"this model ({params / 1e6:,.0f}M parameters) needs {state / 2**30:,.1f} GiB for its weights, "
                        f"gradients and {setup.optimizer} state alone, more than the {memory / 2**30:,.1f} GiB of "
                        f"{where}; pick a smaller --model or --depth (--estimate_memory shows what fits)")
