"""Each common change made from outside the toolkit, the way DESIGN.md says to make it: one file of
its own (here, this one) plus one registration, then trained through pretraining_advanced.py's
command line. Nothing in the core names these components."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import gpt_train as gt
import pretraining_advanced as adv
from gptkit.attention import ATTENTIONS, AttentionSpec, CausalSelfAttention, register_attention
from gptkit.config import setting
from gptkit.data.sources import SOURCES, DataSource, SourceKind, register_source
from gptkit.metrics import STEP_METRICS, StepMetric, register_metric
from gptkit.optim import OPTIMIZERS, OptimizerSpec, decay_groups, register_optimizer, trainable
from gptkit.schedules import SCHEDULES, ScheduleSpec, register_schedule


@pytest.fixture
def base(small_corpus, tmp_path):
    return ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2", "--model",
            "debug", "--batch_size", "4", "--warmup_steps", "2", "--lr", "2e-3", "--eval_iters", "2", "--no-progress",
            "--log_every", "1", "--seed", "5", "--dtype", "fp32", "--eval_every", "0", "--sample_every", "0"]


def registered(registry: dict, register, spec):
    """Register `spec` for one test, and take it out again after."""
    register(spec)
    yield spec
    registry.pop(spec.name, None)


# ----------------------------------------------------------------------------------------------
# An optimizer: SGD with momentum, its own flag --sgd_momentum


@dataclasses.dataclass
class SGDConfig:
    momentum: float = setting(0.9, "SGD momentum", check=(lambda v: 0 <= v < 1, "in [0, 1)"))


def build_sgd(model, args, config: SGDConfig, device):
    return torch.optim.SGD(decay_groups(trainable(model), args.weight_decay), lr=args.lr, momentum=config.momentum)


@pytest.fixture
def sgd():
    yield from registered(OPTIMIZERS, register_optimizer, OptimizerSpec(
        "sgd", "SGD with momentum", build_sgd, lambda shapes, cfg: sum(4 * math.prod(s) for s in shapes.values()),
        kind="SGD", config=SGDConfig))


def test_an_optimizer_plugs_in_with_its_flags_planner_bytes_and_exact_resume(sgd, base, tmp_path):
    flags = [*base, "--optimizer", "sgd", "--sgd_momentum", "0.5", "--max_steps", "6", "--keep_last", "0"]
    full = adv.main([*flags, "--run_dir", str(tmp_path / "full")])
    adv.main([*flags, "--run_dir", str(tmp_path / "part"), "--max_steps", "3"])
    resumed = adv.main([*flags, "--run_dir", str(tmp_path / "part"), "--resume", "auto"])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]  # momentum buffers saved and loaded
    ckpt = gt.load_checkpoint(full["checkpoint"])
    assert ckpt["optimizer"]["kind"] == "SGD" and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.5
    cfg = gt.get_config("debug")
    params = gt.count_parameters_from_config(cfg)["tied"]
    assert gt.memory_plan(cfg, gt.TrainSetup(optimizer="sgd"))["optimizer"] == 4 * params  # the spec's byte count
    assert full["optimizer_state_bytes"] == 4 * params  # and it is what SGD holds
    with pytest.raises(gt.UserError, match="--sgd_momentum is a setting of --optimizer sgd"):
        adv.main([*base, "--sgd_momentum", "0.5", "--run_dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------------------------
# A schedule: the LR halves every 2 steps


def halving(step, s):
    return s.lr * 0.5 ** (step // 2)


@pytest.fixture
def step_schedule():
    yield from registered(SCHEDULES, register_schedule, ScheduleSpec("halving", halving, "halves every 2 steps"))


def test_a_schedule_plugs_in(step_schedule, base, tmp_path):
    at = base.index("--warmup_steps")
    no_warmup = base[:at] + base[at + 2 :]
    res = adv.main([*no_warmup, "--schedule", "halving", "--max_steps", "5", "--run_dir", str(tmp_path / "r")])
    assert res["history"]["lr"] == [2e-3, 2e-3, 1e-3, 1e-3, 5e-4]
    with pytest.raises(gt.UserError, match="--warmup_steps has no effect with --schedule halving"):
        adv.main([*base, "--schedule", "halving", "--max_steps", "5", "--run_dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------------------------
# A metric: the norm of the weights, measured on the device, in the one reduction of the step


def weight_norm(ctx):
    return torch.sqrt(sum((p.detach().float() ** 2).sum() for p in gt.unwrap_model(ctx.model).parameters()))


@pytest.fixture
def norm_metric():
    yield from registered(STEP_METRICS, register_metric, StepMetric(
        "weight_norm", lambda v: f"weight_norm {v:.3f}", device=weight_norm, history="weight_norm"))


def test_a_metric_plugs_in(norm_metric, base, tmp_path):
    res = adv.main([*base, "--max_steps", "3", "--run_dir", str(tmp_path / "r"), "--tensorboard"])
    norms = res["history"]["weight_norm"]
    assert len(norms) == 3 and all(n > 1 for n in norms)
    model, _ = __import__("wt_load").load_ours(res["checkpoint"])
    assert norms[-1] != weight_norm(type("C", (), {"model": model})())  # measured before the last update
    log = (tmp_path / "r" / "train.log").read_text()
    assert log.count("| weight_norm ") == 3
    assert json.loads((tmp_path / "r" / "losses.json").read_text())["weight_norm"] == norms
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/weight_norm")] == pytest.approx(norms)


# ----------------------------------------------------------------------------------------------
# A data source: toy:N, N generated documents


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box jovially".split()


def toy_rows(source, i, skip, batch_size):
    rng = np.random.default_rng(0)
    docs = [f"Toy {k}: " + " ".join(rng.choice(WORDS, size=60)) for k in range(source.parts[i])]
    for start in range(skip, len(docs), batch_size):
        yield docs[start : start + batch_size]


@pytest.fixture
def toy_source():
    kind = SourceKind("toy", claims=lambda data, options: data.startswith("toy:"),
                      resolve=lambda data, options: DataSource("toy", [int(data[4:])], None, "text", [data]),
                      identity=lambda source, known: {"kind": "toy", "docs": source.parts},
                      rows=toy_rows, probe=lambda source: None)
    yield from registered(SOURCES, register_source, kind)


def test_a_data_source_plugs_in(toy_source, base, tmp_path):
    flags = [f for f in base if f]
    flags[flags.index("--data") + 1] = "toy:400"
    res = adv.main([*flags, "--max_steps", "3", "--run_dir", str(tmp_path / "r")])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "toy", "docs": [400]} and manifest["documents"] == 400
    assert res["state"].step == 3
    with pytest.raises(gt.UserError, match="was built from toy:400"):  # the identity is checked like any other
        flags[flags.index("--data") + 1] = "toy:300"
        adv.main([*flags, "--max_steps", "3", "--run_dir", str(tmp_path / "r2")])


# ----------------------------------------------------------------------------------------------
# An attention: causal, but each position sees only the 4 before it


class WindowAttention(CausalSelfAttention):
    WINDOW = 4

    def __init__(self, cfg):
        super().__init__(cfg)
        self.flash = False  # the explicit softmax, with this mask

    def mask(self, q_pos, k_pos):
        return (k_pos[None, :] > q_pos[:, None]) | (k_pos[None, :] < q_pos[:, None] - self.WINDOW + 1)


@pytest.fixture
def window():
    yield from registered(ATTENTIONS, register_attention, AttentionSpec(
        "window4", WindowAttention, "causal, 4 positions wide", score_flops=lambda cfg, T: 12 * cfg.emb_dim * min(4, T)))


def test_an_attention_plugs_in(window, base, tmp_path):
    res = adv.main([*base, "--attention", "window4", "--max_steps", "3", "--run_dir", str(tmp_path / "r")])
    cfg = gt.GPTConfig.from_dict(gt.load_checkpoint(res["checkpoint"])["config"])
    assert cfg.attention == "window4"
    model = gt.GPTModel(cfg).eval()
    x = torch.randint(0, 50257, (1, 12))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 50257  # beyond the window of the positions >= 4 (two blocks: 7 back)
    with torch.no_grad():
        assert torch.equal(model(x)[0, 8:], model(y)[0, 8:]) and not torch.equal(model(x)[0, 1], model(y)[0, 1])
    assert gt.flops_per_token(cfg, 32) < gt.flops_per_token(gt.get_config("debug"), 32)
    with pytest.raises(gt.UserError, match="not GPT-2's"):
        __import__("wt_load").main(["to-hf", str(res["checkpoint"]), str(tmp_path / "hf")])
