"""The GPT-2 model: config and presets, MLP, block, model, and the counts that follow from a config
(parameters, training FLOPs). Pure functions of a config: no files, no devices.

Rules a change here must respect (other files match on them):
- Parameter names are Hugging Face's GPT2LMHeadModel names without `transformer.`: `wte`, `wpe`,
  `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`, `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`,
  `ln_f`, `lm_head`. wt_load.py converts weights by these names (and transposes the four `c_*` weights)
  and the init below scales every `c_proj.weight`. Optimizers that treat matrices apart (GaLore, Muon)
  take every 2-D weight under `h.` (`block_matrices`), whatever the attention names its own.
- `GPTConfig` fields are architecture (they fix tensor shapes or wiring: a checkpoint must agree on
  them to load) unless declared with `runtime_field()`. `ARCH_FIELDS` is derived from that; a new field
  is architecture by default.
- The attention is chosen by name (`attention`, gptkit/attention.py) and so is its FLOP count.
- `GPTModel.forward(idx)` takes (B, T) token ids and returns (B, T, vocab_size) logits; the loss,
  generation, evaluation and exports rely on nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptkit.attention import attention_spec
from gptkit.errors import UserError


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
    attention: str = "causal"  # a registered AttentionSpec (gptkit/attention.py)
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
        self.attn = attention_spec(cfg.attention).build(cfg)
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
    """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N plus the attention's
    score FLOPs per layer (12 C T for causal attention, from its spec), where N counts the
    non-embedding weights plus the head matmul."""
    T = seq_len or cfg.context_length
    n = count_parameters_from_config(cfg)["non_embedding"] + cfg.vocab_size * cfg.emb_dim  # padded rows: no useful work
    return 6 * n + cfg.n_layers * attention_spec(cfg.attention).score_flops(cfg, T)


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


def block_matrices(named_parameters) -> list[tuple[str, torch.nn.Parameter]]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections): what GaLore
    projects and Muon orthogonalises. Embeddings, the head, biases and LayerNorms are not among them."""
    return [(n, p) for n, p in named_parameters if n.startswith("h.") and p.dim() == 2]


@functools.lru_cache(maxsize=16)
def _parameter_shapes(arch: tuple) -> tuple:
    with torch.device("meta"):
        model = GPTModel(GPTConfig(**dict(arch)))
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every unique parameter's shape (the tied head once), without allocating the model."""
    return dict(_parameter_shapes(tuple(sorted((k, v) for k, v in cfg.to_dict().items() if k in ARCH_FIELDS))))
