"""The runtime: the one place that decides device, precision, autocast, gradient scaling, compile and
how the model is wrapped (DDP, or FSDP2 with per-block `fully_shard`, a bf16 policy and CPU offload);
the process group under torchrun; decisions made once on rank 0 and handed to every rank; and the
GPU peak FLOP/s behind MFU."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from gptkit.errors import UserError
from gptkit.model import unwrap_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: str = "fp32"
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    dtype_reason: str = ""  # why this precision, for the log line
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2)
    cpu_offload: bool = False  # with fsdp: keep them on the host, on the GPU only while a block computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp_mixed_precision(self) -> bool:
        """On GPUs a sharded bf16 run computes in bf16 through FSDP's policy (parameters gathered in
        bf16, gradients reduced in fp32), not through autocast."""
        return self.fsdp and self.device.type == "cuda" and self.dtype == "bf16"

    def autocast(self):
        if self.dtype == "fp32" or self.fsdp_mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def grad_scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device, then shard (FSDP2) or compile and wrap in DDP under several processes."""
        if self.fsdp:
            return self._shard(model)
        model = model.to(self.device)
        if self.compile:
            model = torch.compile(model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: each transformer block is a unit of its own (gathered to compute, freed after), the
        root holds the embeddings, the final LayerNorm and the (tied) head."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if self.fsdp_mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            model = model.to(self.device)
        for block in model.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return torch.compile(model) if self.compile else model

    @staticmethod
    def grad_sync(model: nn.Module, sync: bool):
        """Gradients are reduced on the last micro-batch of a step only: DDP's no_sync before it, or
        FSDP's set_requires_gradient_sync (no reduce-scatter per micro-batch)."""
        sharded = unwrap_model(model)
        if hasattr(sharded, "set_requires_gradient_sync"):
            sharded.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _check_available(dev: torch.device, name: str) -> None:
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: this toolkit trains on cpu, cuda or mps; use one of those or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type == "mps" and not _mps_available():
        raise UserError(f"--device {name} was asked for but this machine has no Apple GPU (MPS); use --device cpu or auto")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    _check_available(dev, name)
    if dev.type != "cuda":
        return dev
    if dev.index is None:  # plain "cuda": this process's GPU under torchrun (LOCAL_RANK), else the first
        return torch.device("cuda", local_rank)
    if dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return dev


def setup_runtime(device: str = "auto", dtype: str = "fp32", compile: bool = False,
                  rank: int = 0, world_size: int = 1, local_rank: int = 0, fsdp: bool = False,
                  cpu_offload: bool = False) -> Runtime:
    """dtype "auto" is bf16 on a GPU that supports it (no loss scaling needed, half the memory traffic)
    and fp32 everywhere else."""
    dev = resolve_device(device, local_rank)
    reason = f"--dtype {dtype}"
    if dtype == "auto":
        dtype, reason = auto_dtype(dev)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16 support; use --dtype fp16 (with loss scaling) or fp32")
        # TF32 matmuls: ~1e-3 relative error, far below training noise, several times the fp32 speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, dtype, compile, rank, world_size, reason, fsdp, cpu_offload)


def native_bf16(dev: torch.device) -> bool:
    """Whether this device computes bf16 natively (else bf16 is emulated, slower than fp32)."""
    return auto_dtype(dev)[0] == "bf16"


def auto_dtype(dev: torch.device) -> tuple[str, str]:
    """What --dtype auto means on this device, and why: bf16 autocast where the hardware computes bf16
    natively (a bf16-capable GPU; a CPU with AMX-BF16, AVX512-BF16 or Arm BF16; Apple silicon's GPU
    through MPS), fp32 elsewhere (emulated bf16 would be slower than fp32)."""
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16"
        return "fp32", "auto: this GPU has no bf16"
    if dev.type == "mps":
        return "bf16", "auto: Apple GPU (MPS) computes bf16"
    native = cpu_bf16_feature()
    if native:
        return "bf16", f"auto: the CPU has {native}"
    return "fp32", "auto: the CPU has no native bf16 (no AMX-BF16, AVX512-BF16 or Arm BF16)"


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The CPU's native bf16 instructions, by name, or None: from /proc/cpuinfo on Linux, sysctl on
    macOS. oneDNN must also run bf16 here (torch's own check)."""
    import platform
    import subprocess

    flags = set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            if out == "1":
                flags.add("bf16")
    found = next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "Arm BF16"))
                  if flag in flags), None)
    mkldnn_ok = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)()
    return found if found and mkldnn_ok else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def broadcast_from_main(runtime: Runtime, fn: Callable[[], object], wait_s: float | None = None):
    """Run `fn` on rank 0 and hand its result (or its UserError) to every rank, so a decision made
    once (a run folder claimed, a cache built) is the same everywhere and a refusal stops all ranks.
    With `wait_s` the other ranks wait on the rendezvous store, outside any collective, for up to that
    long: work on rank 0 that takes hours (a token cache build) cannot trip the collective timeout."""
    result, failure = None, None
    if runtime.is_main:
        try:
            result = fn()
        except UserError as e:
            if runtime.world_size == 1:
                raise
            failure = e
    if runtime.world_size == 1:
        return result
    box = (result, None if failure is None else str(failure))
    box = _share(box, runtime, wait_s)
    if box[1] is not None:
        raise failure if failure is not None else UserError(box[1])
    return box[0]


_shared_calls = iter(range(1 << 62))


def _share(obj, runtime: Runtime, wait_s: float | None):
    import pickle
    from datetime import timedelta

    import torch.distributed as dist

    if wait_s is None:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    store = dist.distributed_c10d._get_default_store()
    key = f"gpt_train/shared/{next(_shared_calls)}"
    if runtime.is_main:
        store.set(key, pickle.dumps(obj))
        return obj
    store.wait([key], timedelta(seconds=wait_s))
    return pickle.loads(store.get(key))


# ----------------------------------------------------------------------------------------------
# Under torchrun


def setup_distributed(device: str = "auto", fsdp: bool = False, cpu_offload: bool = False,
                      timeout_min: float = 30.0) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; plain `python` is rank 0 of 1.
    NCCL when the run is on GPUs (with gloo beside it for CPU tensors when FSDP offloads to the
    host: the offloaded gradients and their clipping norm are reduced there), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not (fsdp and "WORLD_SIZE" in os.environ):  # FSDP needs a group, even of one
        return 0, 1, 0
    from datetime import timedelta

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if on_gpu:  # this process's GPU: LOCAL_RANK's, unless --device names one (cuda:N)
        torch.cuda.set_device(resolve_device(device, local_rank))
    backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if on_gpu else "gloo"
    timeout = timedelta(minutes=timeout_min)
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group(backend, timeout=timeout, **_attempt_store(rank, world, timeout))
    return dist.get_rank(), dist.get_world_size(), local_rank


def _attempt_store(rank: int, world: int, timeout) -> dict:
    """Under torchrun, the rendezvous store seen through a prefix of this attempt. torchrun's elastic
    agent keeps one store across the restarts of a group (--max_restarts), so without it a restarted
    worker can read the addresses its peers published in the failed attempt and connect to nothing."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return {}
    import torch.distributed as dist

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timeout)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return {"store": dist.PrefixStore(f"gpt_train/attempt_{attempt}/", store), "rank": rank, "world_size": world}


def teardown_distributed() -> None:
    """No rank tears the group down while a peer still talks to it; DDP's reducer holds the group, so
    it is freed first, not during interpreter exit (a known gloo crash)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def weights_in_sync(model: torch.nn.Module, world: int) -> bool:
    """Whether every rank ends with bit-identical weights (a hash per rank, compared on all)."""
    import torch.distributed as dist

    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    hashes = [None] * world
    dist.all_gather_object(hashes, h.hexdigest())
    return len(set(hashes)) == 1


# ----------------------------------------------------------------------------------------------
# GPU peak FLOP/s, for MFU

# Dense bf16 tensor-core peak by the exact name torch.cuda.get_device_name gives. Only exact names:
# variants of one chip (SXM, PCIe, NVL) differ by up to a third. --peak_tflops overrides.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA H800": 989e12,
    "NVIDIA H800 PCIe": 756e12, "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "NVIDIA A10G": 70e12,
    "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA GeForce RTX 3090": 71e12,
}


def peak_flops_of(gpu_name: str) -> float | None:
    return PEAK_BF16_FLOPS.get(gpu_name.strip())


def peak_flops_for(device: torch.device, override_tflops: float | None = None, warn=print) -> float | None:
    """The device's peak for MFU: --peak_tflops if given, else the table's; None on a CPU, and for a
    GPU the table does not know (with one warning, so a missing MFU is never silent)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_of(name)
    if peak is None:
        warn(f"warning: no bf16 peak FLOP/s known for {name!r}, so no MFU is reported; pass --peak_tflops N (its dense "
             "bf16 tensor TFLOP/s) to have it")
    return peak
