"""The GPT-2 model: config and presets, attention, MLP, block, model, and the counts that follow from
a config (parameters, training FLOPs, memory bytes). Pure functions of a config: no files, no devices.

Rules a change here must respect (other files match on them):
- Parameter names are Hugging Face's GPT2LMHeadModel names without `transformer.`: `wte`, `wpe`,
  `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`, `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`,
  `ln_f`, `lm_head`. wt_load.py converts weights by these names (and transposes the four `c_*` weights),
  GaLore picks its matrices by them (pretraining_advanced.GALORE_TARGETS), and the init below scales
  every `c_proj.weight`.
- `GPTConfig` fields are architecture (they fix tensor shapes or wiring: a checkpoint must agree on
  them to load) unless declared with `runtime_field()`. `ARCH_FIELDS` is derived from that; a new field
  is architecture by default.
- `flops_per_token` counts standard causal attention (12 * n_layers * emb_dim * T per token on top of
  6 per parameter). A variant with other attention costs must change it, or MFU figures will be wrong.
- `GPTModel.forward(idx)` takes (B, T) token ids and returns (B, T, vocab_size) logits; the loss,
  generation, evaluation and exports rely on nothing else.

To try an attention variant: write a module with CausalSelfAttention's constructor and forward
signature, use it in `Block`, keep the projection names (c_attn, c_proj) or teach wt_load the new ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, never a traceback."""


def runtime_field(default):
    """A config field that changes how the model runs, not its weights: checkpoints need not agree on it."""
    return dataclasses.field(default=default, metadata={"arch": False})


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # the tokenizer's ids; logits always have this width
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    qkv_bias: bool = True  # GPT-2 has it; keeping it makes OpenAI/HF weights load one-to-one
    tie_embeddings: bool = True
    # Embedding/head rows rounded up to a multiple of this (50257 -> 50304 with 64): matmul-friendly
    # shapes on GPUs. The extra rows are never a target and are cut off the logits.
    vocab_multiple: int = 1
    drop_rate: float = runtime_field(0.0)
    flash: bool = runtime_field(True)  # SDPA kernels; False = explicit masked softmax (same maths)
    # Recompute each block's activations in the backward pass instead of keeping them: less memory,
    # about a third more compute, identical results.
    activation_checkpointing: bool = runtime_field(False)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name} must be a positive whole number, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise UserError(
                f"model config: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; "
                "pick a head count that divides it"
            )
        if not (isinstance(self.drop_rate, (int, float)) and 0.0 <= self.drop_rate < 1.0):
            raise UserError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that decide tensor shapes or wiring; a checkpoint must agree on these to be loaded.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.metadata.get("arch", True))

PRESETS: dict[str, dict] = {
    "124M": dict(n_layers=12, emb_dim=768, n_heads=12),
    "355M": dict(n_layers=24, emb_dim=1024, n_heads=16),
    "774M": dict(n_layers=36, emb_dim=1280, n_heads=20),
    "1558M": dict(n_layers=48, emb_dim=1600, n_heads=25),
    # A real (if small) GPT that learns visibly in minutes on a laptop CPU.
    "small": dict(n_layers=4, emb_dim=256, n_heads=4, context_length=128),
    # For tests and smoke runs: seconds per hundred steps.
    "debug": dict(n_layers=2, emb_dim=32, n_heads=2, context_length=32),
}
PRESET_ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def get_config(name: str = "124M", **overrides) -> GPTConfig:
    """A preset by name (or GPT-2 alias), with any field overridden; None overrides are ignored."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[key], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**values)


# ----------------------------------------------------------------------------------------------
# Modules


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.flash = cfg.flash
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = None
        if self.flash and not return_attn:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.drop_rate if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_attn else y


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2. Parameter names follow Hugging Face's GPT2LMHeadModel minus the `transformer.` prefix,
    so pretrained weights map one-to-one (wt_load.py)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds tokens and scores them
            self.register_load_state_dict_pre_hook(self._tie_head_on_load)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layers),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @staticmethod
    def _tie_head_on_load(module, state_dict, prefix, *_):
        """A tied head is one tensor: files that store it once (safetensors exports, HF's GPT-2) load
        strictly, the head taken from the embedding."""
        if prefix + "lm_head.weight" not in state_dict and prefix + "wte.weight" in state_dict:
            state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "wte.weight"]

    def set_flash(self, enabled: bool) -> None:
        self.cfg = dataclasses.replace(self.cfg, flash=enabled)
        for block in self.h:
            block.attn.flash = enabled

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.cfg = dataclasses.replace(self.cfg, activation_checkpointing=enabled)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context_length {self.cfg.context_length}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            # Non-reentrant checkpointing: the block runs again in backward, RNG state (dropout) included.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, padded_vocab_size)
        return logits[..., : self.cfg.vocab_size] if self.cfg.vocab_multiple > 1 else logits


# ----------------------------------------------------------------------------------------------
# Counts that follow from a config


def count_parameters(model: GPTModel) -> dict[str, int]:
    """Parameter counts: `tied` as built with a shared embedding/head, `untied` with a separate head,
    `non_embedding` without token and position embeddings (the figure scaling laws use)."""
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head = model.lm_head.weight.numel()
    tied = unique if model.cfg.tie_embeddings else unique - head
    emb = model.wte.weight.numel() + model.wpe.weight.numel()
    return {"tied": tied, "untied": tied + head, "non_embedding": tied - emb}


def count_parameters_from_config(cfg: GPTConfig) -> dict[str, int]:
    with torch.device("meta"):
        return count_parameters(GPTModel(cfg))


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12 L H Q T, where N
    counts the non-embedding weights plus the head matmul (standard causal attention assumed)."""
    T = seq_len or cfg.context_length
    n = count_parameters_from_config(cfg)["non_embedding"] + cfg.vocab_size * cfg.emb_dim  # padded rows: no useful work
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * T


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain GPTModel under DDP (`module`) and torch.compile (`_orig_mod`) wrappers: checkpoints,
    exports and sampling use its names and state dict."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------
# Memory: what training a config takes on one device (the planner behind --estimate_memory)

GALORE_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the matrices GaLore projects
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class TrainSetup:
    """How a config is trained, as far as memory goes."""
    batch_size: int = 8  # sequences per micro-batch per device
    dtype: str = "bf16"  # autocast / FSDP compute precision
    optimizer: str = "adamw"  # or "galore"
    galore_rank: int = 128
    activation_checkpointing: bool = False
    world_size: int = 1  # devices the model is sharded over (FSDP); 1 = every device holds everything
    fsdp: bool = False
    cpu_offload: bool = False
    cuda: bool = True  # count the CUDA context in the margin


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every unique parameter's shape (the tied head once), without allocating the model."""
    return dict(_parameter_shapes(tuple(sorted((k, v) for k, v in cfg.to_dict().items() if k in ARCH_FIELDS))))


@functools.lru_cache(maxsize=16)
def _parameter_shapes(arch: tuple) -> tuple:
    with torch.device("meta"):
        model = GPTModel(GPTConfig(**dict(arch)))
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def galore_state_numel(shape: tuple[int, ...], rank: int) -> int:
    """Floats GaLore keeps for one projected (m, n) matrix: the projector, and Adam's two moments of
    the projected gradient (galore_torch's 'std' projection: from the right when m >= n)."""
    m, n = shape
    r = min(rank, m, n)
    return r * n + 2 * m * r if m >= n else m * r + 2 * r * n


def optimizer_state_bytes_of(cfg: GPTConfig, optimizer: str = "adamw", galore_rank: int = 128) -> int:
    """Bytes of optimizer state after the first step: AdamW's two fp32 moments and its fp32 step
    counter per parameter tensor; GaLore's projected state for the attention/MLP matrices (its step
    counters are Python ints) and AdamW-like moments for the rest."""
    total = 0
    for name, shape in parameter_shapes(cfg).items():
        numel = math.prod(shape)
        if optimizer == "galore" and len(shape) == 2 and any(t in name for t in GALORE_TARGETS):
            total += 4 * galore_state_numel(shape, galore_rank)
        elif optimizer == "galore":
            total += 8 * numel
        else:
            total += 8 * numel + 4
    return total


def activation_bytes_per_token(cfg: GPTConfig, dtype: str, checkpointing: bool) -> float:
    """Bytes the backward pass keeps per token. Per block without checkpointing, in fp32: its input,
    both LayerNorm outputs, q/k/v, the attention output and its projection input, the MLP's hidden
    activations before and after GELU: about 17 x emb_dim floats (autocast keeps the matmul inputs
    in 16 bits: about 38 x emb_dim bytes); explicit attention adds the (T x T) probabilities per head.
    With checkpointing only each block's input is kept, plus one block's worth while it is recomputed."""
    h, per_block = cfg.emb_dim, (68 if dtype == "fp32" else 38) * cfg.emb_dim
    if not cfg.flash:
        per_block += 2 * cfg.n_heads * cfg.context_length * DTYPE_BYTES[dtype]
    if checkpointing:
        return cfg.n_layers * 4 * h + per_block + 16 * h
    return cfg.n_layers * per_block + 16 * h  # + embeddings and the final LayerNorm


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
        "optimizer": on_device * optimizer_state_bytes_of(cfg, setup.optimizer, setup.galore_rank) / shard,
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
