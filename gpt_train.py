"""The shared core of the toolkit, in one import: `import gpt_train as gt` gives the model, the
tokenizer, data, the loop and the run state that both training scripts use. Its body lives in the
gptkit/ package, one room per reason to change (DESIGN.md has the map); this module only gathers
the names, so code written against `gt.` keeps working.

Importing it has no side effects: no argument parsing, no downloads, no prints.
"""

# ruff: noqa: F401  (everything here is re-exported)
from gptkit.args import RUN_MECHANICS, args_to_dict, default_run_dir, steps_for_tokens_per_param, train_config
from gptkit.attention import ATTENTIONS, AttentionSpec, CausalSelfAttention, attention_spec, register_attention
from gptkit.checkpoint.folder import CheckpointIndex, ResumePoint, RunFolder, read_run_info
from gptkit.checkpoint.state import (
                                     CheckpointState,
                                     DictPart,
                                     ModelPart,
                                     OptimizerPart,
                                     RNGPart,
                                     ScalerPart,
                                     capture_rng_state,
                                     check_config_matches,
                                     payload_checksum,
                                     restore_rng_state,
)
from gptkit.checkpoint.store import SHARDED_DONE, checkpoint_header, dcp_load, load_checkpoint, peek_checkpoint, save_checkpoint
from gptkit.cli import run_cli
from gptkit.config import (
                                     HelpFormatter,
                                     add_flags,
                                     finite,
                                     from_args,
                                     read_config_file,
                                     refuse_together,
                                     write_config_file,
)
from gptkit.data.batches import BatchSampler, TokenWindowDataset, create_dataloader
from gptkit.errors import CheckpointError, RunFailure, UserError
from gptkit.files import (
                                     DISK_FULL,
                                     FolderLock,
                                     atomic_write,
                                     dir_mode,
                                     disk_full,
                                     file_mode,
                                     full_disk_cause,
                                     process_umask,
                                     sha256_file,
                                     write_json,
)
from gptkit.generation import (
                                     generate,
                                     generate_and_print_sample,
                                     generate_batch,
                                     next_token,
                                     text_to_token_ids,
                                     token_ids_to_text,
)
from gptkit.loop import Reporter, StepResult, StopSignal, TrainConfig, TrainState, train_step
from gptkit.loss import _MeanCrossEntropy, calc_loss_batch, compiled_cross_entropy, evaluate_model, loss_sums
from gptkit.metrics import STEP_METRICS, StepMetric, format_log_line, register_metric
from gptkit.model import (
                                     ARCH_FIELDS,
                                     MLP,
                                     PRESET_ALIASES,
                                     PRESETS,
                                     Block,
                                     GPTConfig,
                                     GPTModel,
                                     block_matrices,
                                     count_parameters,
                                     count_parameters_from_config,
                                     flops_per_token,
                                     get_config,
                                     unwrap_model,
)
from gptkit.optim import OPTIMIZERS, OptimizerSpec, optimizer_spec, register_optimizer
from gptkit.optim.adamw import make_adamw
from gptkit.planner import TrainSetup, checkpoint_bytes, largest_micro_batch, memory_plan, memory_report, optimizer_state_bytes_of
from gptkit.progress import PlainProgress, progress_bar, progress_write
from gptkit.run import Evaluation, check_resume, check_run, holding, open_run, plot_losses, run_training, vocab_multiple_for
from gptkit.runtime import (
                                     DTYPES,
                                     Runtime,
                                     auto_dtype,
                                     broadcast_from_main,
                                     cpu_bf16_feature,
                                     resolve_device,
                                     seed_everything,
                                     setup_runtime,
)
from gptkit.schedules import SCHEDULES, ScheduleSpec, cosine_lr, register_schedule
from gptkit.tokenizer import (
                                     EOT_ID,
                                     EOT_TOKEN,
                                     default_cache_name,
                                     encode_documents,
                                     get_tokenizer,
                                     gpt2_bpe_files,
                                     load_tokenizer,
                                     tokenizer_fingerprint,
                                     use_tokenizer,
)
from gptkit.trainer import Trainer
from gptkit.weights import export_safetensors, init_weights, load_any, load_ours, new_model, save_from_model
