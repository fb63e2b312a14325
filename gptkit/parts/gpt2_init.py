"""GPT-2's initialisation: every weight N(0, 0.02), biases zero, norms at one, and the projections
that write into the residual stream (`c_proj`) scaled by 1/sqrt(2 x n_layers), so the stream's
variance does not grow with depth."""

import math

import torch.nn as nn

from gptkit.parts import InitSpec, register_init


def gpt2_init(model) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * model.cfg.n_layers))


register_init(InitSpec("gpt2", gpt2_init, "GPT-2's: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)"))
