"""Zero-initialised output projections (modded-nanogpt, nanochat): GPT-2's initialisation, except that
every projection writing into the residual stream (`c_proj`) and an untied head start at zero. Each
block then starts as the identity and the first logits are uniform; the gradients still reach every
weight (the zero matrices get theirs from their inputs)."""

import torch.nn as nn

from gptkit.parts import InitSpec, register_init
from gptkit.parts.gpt2_init import gpt2_init


def zero_proj_init(model) -> None:
    gpt2_init(model)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.zeros_(p)
    if not model.cfg.tie_embeddings:
        nn.init.zeros_(model.lm_head.weight)


register_init(InitSpec("zero_proj", zero_proj_init, "GPT-2's, with the residual projections and an untied head "
                                                    "at zero (nanochat)"))
