"""Block parts, pluggable: how a position enters the model, the normalisation, the MLP and the
initialisation are each a registry of variants (the attention's is gptkit/attention.py), and an
arch is a named set of them (`--arch gpt2|llama|modern`). A variant is one file with one
registration; its settings (a dataclass, `config=`) become flags --NAME_FIELD and are recorded in the
checkpoint's model config (`GPTConfig.parts`), so a resume or export with other settings is refused.

    POSITIONS  learned (GPT-2's table), rotary                    --position NAME
    NORMS      layernorm, rmsnorm                                  --norm NAME (also the QK-norm's)
    MLPS       gelu (GPT-2), relu2 (nanochat), swiglu (Llama)      --mlp NAME
    INITS      gpt2, zero_proj                                     --init NAME
    ARCHS      gpt2, llama, modern                                 --arch NAME

On/off choices (the head tied or not, biases, QK-norm, a norm after the embedding, the number of
key/value heads) are GPTConfig fields of their own, set by an arch or one flag each.

How to add a variant: copy an example (examples/plugins/alibi.py for a position,
bias_free_layernorm.py for a norm): a file with its module and `register_norm(NormSpec("mine", build,
...))` (or register_position, register_mlp, register_init, register_arch), loaded with `--plugin
FILE`; nothing in the toolkit changes. One that ships with the toolkit is listed in BUILTIN.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from gptkit.registry import Registry, settings_of


@dataclass(frozen=True)
class PositionSpec:
    name: str
    help: str = ""
    # A module added to the token embedding: positions (T,) or (B, T) -> (..., emb_dim) (learned tables).
    embedding: Callable[[object], object] | None = None
    # A module applied to each head's queries and keys: (q, k, positions) -> (q, k), q (B, T, heads, head_dim).
    rotary: Callable[[object], object] | None = None
    # A module adding a bias to every head's attention scores by where the query and key are (ALiBi):
    # (q_pos (T,), k_pos (S,)) -> (heads, T, S), added to q.k / sqrt(head_dim) before the softmax.
    score_bias: Callable[[object], object] | None = None
    config: type | None = None


@dataclass(frozen=True)
class NormSpec:
    name: str
    build: Callable[[object, int], object]  # (GPTConfig, width) -> module normalising the last dimension
    help: str = ""
    config: type | None = None


@dataclass(frozen=True)
class MLPSpec:
    name: str
    build: Callable[[object], object]  # GPTConfig -> module (B, T, C) -> (B, T, C)
    help: str = ""
    # Floats per token the backward keeps inside the MLP (the memory planner): 8 x emb_dim for a 4x MLP.
    activation_floats: Callable[[object], float] = lambda cfg: 8 * cfg.emb_dim
    config: type | None = None


@dataclass(frozen=True)
class InitSpec:
    name: str
    apply: Callable[[object], None]  # GPTModel -> None: sets every weight
    help: str = ""
    config: type | None = None


@dataclass(frozen=True)
class ArchSpec:
    """A named set of parts: GPTConfig values (`fields`) and part settings (`parts`, by part name)."""
    name: str
    help: str
    fields: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)


POSITIONS: Registry[PositionSpec] = Registry("position", selector="position")
NORMS: Registry[NormSpec] = Registry("norm", selector="norm")
MLPS: Registry[MLPSpec] = Registry("mlp", selector="mlp")
INITS: Registry[InitSpec] = Registry("init", selector="init")
ARCHS: Registry[ArchSpec] = Registry("arch", selector="arch")
register_position, register_norm, register_mlp = POSITIONS.add, NORMS.add, MLPS.add
register_init, register_arch = INITS.add, ARCHS.add


def part_settings(cfg, registry: Registry, name: str):
    """The settings of part `name` (of `registry`) as the model config records them (defaults filled)."""
    return settings_of(registry.spec(name), (cfg.parts or {}).get(name))


def build_norm(cfg, width: int):
    """The config's normalisation (--norm) over the last dimension of size `width`."""
    return NORMS.spec(cfg.norm).build(cfg, width)


BUILTIN = ("gptkit.parts.learned", "gptkit.parts.rotary", "gptkit.parts.layernorm", "gptkit.parts.rmsnorm",
           "gptkit.parts.gelu", "gptkit.parts.relu2", "gptkit.parts.swiglu", "gptkit.parts.gpt2_init",
           "gptkit.parts.zero_proj", "gptkit.parts.archs")
for _module in BUILTIN:
    importlib.import_module(_module)
