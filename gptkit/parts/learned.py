"""GPT-2's learned positions: a table of one vector per position, added to the token embedding."""

import torch.nn as nn

from gptkit.parts import PositionSpec, register_position


def table(cfg) -> nn.Module:
    return nn.Embedding(cfg.context_length, cfg.emb_dim)  # becomes GPTModel.wpe (GPT-2's name)


register_position(PositionSpec("learned", "GPT-2's learned position table, added to the token embedding",
                               embedding=table))
