"""Kept so that `import gpt_model` goes on working: the model lives in gptkit/model.py (and the
attention in gptkit/attention.py, the memory planner in gptkit/planner.py)."""

# ruff: noqa: F401, F403
from gptkit.attention import CausalSelfAttention
from gptkit.errors import UserError
from gptkit.model import *
from gptkit.model import ARCH_FIELDS, PRESET_ALIASES, PRESETS
from gptkit.planner import TrainSetup, largest_micro_batch, memory_plan, optimizer_state_bytes_of
