"""Precision: which autocast dtype a model trains in, by rule, and the autocast context."""
from contextlib import nullcontext

import torch


def cuda_has_native_bf16(device=None):
    """True when the GPU computes bf16 in hardware (Ampere and newer).

    torch.cuda.is_bf16_supported() also counts emulation, which makes a T4, V100 or P100 run
    bf16 slowly in software; those get fp16 with loss scaling instead.
    """
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a PyTorch without the argument: judge by the compute capability
        return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(model_name, device, amp=None):
    """The autocast dtype for a model, or None for float32, by rule (no measurement).

    CUDA: bf16 where the GPU has it in hardware, else fp16 (with a GradScaler), unless amp is
    False. CPU: float32 unless amp is True (bf16). In auto mode a training run on a CPU uses the
    per-machine decision instead (tuning.decide_precisions); this rule serves --evaluate and
    forced modes.
    """
    if device.type == 'cuda':
        if amp is False:
            return None
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return torch.bfloat16 if amp else None


def configure_backends(device):
    """cuDNN autotuning on CUDA: every batch has the same shape, so the search pays once."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True


def autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


PRECISION_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast


def precision_name(dtype):
    return {d: n for n, d in PRECISION_DTYPES.items()}[dtype]
