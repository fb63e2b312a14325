"""The model: config and presets, the block and the model, and the counts that follow from a config
(parameters, training FLOPs). Pure functions of a config: no files, no devices. GPT-2 by default;
the parts of newer blocks (rotary, RMSNorm, QK-norm, ReLU^2/SwiGLU, untied head, GQA) are chosen by
name from gptkit/parts and gptkit/attention.py, and `--arch` names sets of them.

Rules a change here must respect (other files match on them):
- Parameter names are Hugging Face's GPT2LMHeadModel names without `transformer.`: `wte`, `wpe`,
  `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`, `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`,
  `ln_f`, `lm_head` (plus `ln_emb`, `h.{i}.attn.q_norm` and `k_norm` when a part has them). wt_load.py
  converts weights by these names, and the inits treat every `c_proj.weight` as a residual projection.
  Optimizers that treat matrices apart (GaLore, Muon) take every 2-D weight under `h.`
  (`block_matrices`), whatever the attention names its own.
- `GPTConfig` fields are architecture (they fix tensor shapes or wiring: a checkpoint must agree on
  them to load) unless declared with `runtime_field()`. `ARCH_FIELDS` is derived from that; a new field
  is architecture by default. A part's own settings live in `parts`, never in new fields.
- `GPTModel.forward(idx)` takes (B, T) token ids and returns (B, T, vocab_size) logits; the loss,
  evaluation and exports rely on nothing else (generation adds a KV cache).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptkit.attention import ATTENTIONS, AttentionInput, attention_spec
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
    # The block parts (gptkit/parts): each a registered name; GPT-2's by default.
    position: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    init: str = "gpt2"
    bias: bool = True  # biases in the projections, the MLP and the norms (qkv_bias: the q/k/v projection's)
    qk_norm: bool = False  # each head's queries and keys normalised (with the --norm kind)
    embed_norm: bool = False  # a norm right after the token embedding (nanochat)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: one per query head
    parts: dict = dataclasses.field(default_factory=dict)  # the chosen parts' settings: {part name: {field: value}}
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
        if self.n_kv_heads is not None and (isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int)
                                            or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise UserError(f"model config: n_kv_heads must be a whole number that divides n_heads {self.n_heads}, "
                            f"got {self.n_kv_heads!r}")
        if not (isinstance(self.drop_rate, (int, float)) and 0.0 <= self.drop_rate < 1.0):
            raise UserError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate!r}")
        self.parts = dict(self.parts or {})
        _check_parts(self)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def chosen_parts(self) -> list:
        """(registry, chosen name) of every pluggable part of this config."""
        from gptkit.parts import INITS, MLPS, NORMS, POSITIONS

        return [(ATTENTIONS, self.attention), (POSITIONS, self.position), (NORMS, self.norm), (MLPS, self.mlp),
                (INITS, self.init)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _check_parts(cfg: GPTConfig) -> None:
    """Every part is registered (one error line naming it, with the --plugin hint), and the recorded
    settings are those of chosen parts and pass their checks."""
    from gptkit.config import check
    from gptkit.registry import settings_of

    chosen = {}
    for registry, name in cfg.chosen_parts():
        chosen[name] = registry.spec(name)
    for name, values in cfg.parts.items():
        if name not in chosen:
            raise UserError(f"model config: settings for part {name!r}, which this model does not use")
        check(settings_of(chosen[name], values), name)
    if cfg.position == "rotary" and cfg.head_dim % 2:
        raise UserError(f"model config: rotary positions need an even head size, got {cfg.head_dim}")


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


def MLP(cfg: GPTConfig) -> nn.Module:
    """The config's MLP (--mlp; GPT-2's 4x GELU MLP by default)."""
    from gptkit.parts import MLPS

    return MLPS.spec(cfg.mlp).build(cfg)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from gptkit.parts import build_norm

        self.ln_1 = build_norm(cfg, cfg.emb_dim)
        self.attn = attention_spec(cfg.attention).build(cfg)
        self.ln_2 = build_norm(cfg, cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx: AttentionInput | None = None):
        x = x + self.attn(self.ln_1(x), ctx)  # pre-norm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2, and the newer blocks as parts (gptkit/parts). Parameter names follow Hugging Face's
    GPT2LMHeadModel minus the `transformer.` prefix, so GPT-2 weights map one-to-one (wt_load.py)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from gptkit.parts import INITS, POSITIONS, build_norm

        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        table = POSITIONS.spec(cfg.position).embedding
        self.wpe = table(cfg) if table is not None else None  # learned positions (GPT-2); rotary: none
        self.ln_emb = build_norm(cfg, cfg.emb_dim) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = build_norm(cfg, cfg.emb_dim)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds tokens and scores them
            self.register_load_state_dict_pre_hook(self._tie_head_on_load)
        INITS.spec(cfg.init).apply(self)

    @staticmethod
    def _tie_head_on_load(module, state_dict, prefix, *_):
        """A tied head is one tensor: files that store it once (safetensors exports, HF's GPT-2) load
        strictly, the head taken from the embedding."""
        if prefix + "lm_head.weight" not in state_dict and prefix + "wte.weight" in state_dict:
            state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "wte.weight"]

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C): the token embedding, plus learned positions, then the embedding's
        norm, as the model has them (what the first block sees)."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions if positions is not None else torch.arange(idx.size(1), device=idx.device))
        return self.ln_emb(x) if self.ln_emb is not None else x

    def forward(self, idx: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits. Generation passes a KVCache (the tokens
        before these are in it), and for left-padded prompts each token's position (B, T) and which
        keys are padding (B, cache length + T)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence length {start + T} exceeds the model's context_length {self.cfg.context_length}")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.embed(idx, positions))  # (B, T, C)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            ctx = AttentionInput(positions, cache.layers[i] if cache is not None else None, key_padding)
            # Non-reentrant checkpointing: the block runs again in backward, RNG state (dropout) included.
            x = checkpoint(block, x, ctx, use_reentrant=False) if recompute else block(x, ctx)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, padded_vocab_size)
        return logits[..., : self.cfg.vocab_size] if self.cfg.vocab_multiple > 1 else logits


# ----------------------------------------------------------------------------------------------
# Counts that follow from a config


def count_parameters(model: GPTModel) -> dict[str, int]:
    """Parameter counts: `total` as built (a tied head once), `tied` and `untied` as if the head were
    shared with the embedding or not, `non_embedding` without the token and position tables and an
    untied head (the figure scaling laws use; the head still costs compute: flops_per_token)."""
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head = model.lm_head.weight.numel()
    tied = unique if model.cfg.tie_embeddings else unique - head
    emb = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    return {"total": unique, "tied": tied, "untied": tied + head, "non_embedding": tied - emb}


def count_parameters_from_config(cfg: GPTConfig) -> dict[str, int]:
    """count_parameters without allocating: a model of one and of two blocks on the meta device (every
    block is built alike), so a config of 10,000 layers is counted in milliseconds."""
    if cfg.n_layers <= 2:
        with torch.device("meta"):
            return count_parameters(GPTModel(cfg))
    one, two = (count_parameters_from_config(dataclasses.replace(cfg, n_layers=n)) for n in (1, 2))
    return {k: one[k] + (cfg.n_layers - 1) * (two[k] - one[k]) for k in one}


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
def _parameter_shapes(arch: str) -> tuple:
    """A model of one block on the meta device, its block's shapes repeated for every block (every block
    is built alike): fast for any depth."""
    cfg = GPTConfig(**json.loads(arch))
    with torch.device("meta"):
        model = GPTModel(dataclasses.replace(cfg, n_layers=1))
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    first = next(i for i, (n, _) in enumerate(shapes) if n.startswith("h.0."))
    block = [(n[len("h.0."):], s) for n, s in shapes if n.startswith("h.0.")]
    blocks = [(f"h.{i}.{n}", s) for i in range(cfg.n_layers) for n, s in block]
    return tuple(shapes[:first] + blocks + [(n, s) for n, s in shapes[first:] if not n.startswith("h.0.")])


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every unique parameter's shape (the tied head once), without allocating the model."""
    return dict(_parameter_shapes(json.dumps({k: v for k, v in cfg.to_dict().items() if k in ARCH_FIELDS},
                                             sort_keys=True)))
