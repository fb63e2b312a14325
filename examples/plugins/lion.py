"""A user's optimizer, as a plugin: Lion (Chen et al. 2023), the sign of an interpolated momentum.
Elementwise, so it runs on FSDP shards as well as on whole tensors."""

import math
from dataclasses import dataclass

import torch

from gptkit.config import setting
from gptkit.optim import OptimizerSpec, decay_groups, register_optimizer, trainable


@dataclass
class LionConfig:
    beta1: float = setting(0.9, "Lion's interpolation of momentum and gradient", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    beta2: float = setting(0.99, "Lion's momentum decay", check=(lambda v: 0 <= v < 1, "in [0, 1)"))


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr, betas, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m * b1 + p.grad * (1 - b1)).sign_(), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def build(model, args, config: LionConfig, device):
    return Lion(decay_groups(trainable(model), args.weight_decay), args.lr, (config.beta1, config.beta2),
                args.weight_decay)


register_optimizer(OptimizerSpec("lion", "Lion: the sign of an interpolated momentum", build,
                                 lambda shapes, config: sum(4 * math.prod(s) for s in shapes.values()),
                                 kind="Lion", config=LionConfig))
