"""The device a run trains on: --device resolved and checked (a refusal is a UsageError, exit 2)."""
import argparse

import torch

from kd.run.config import UsageError


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)') \
            from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {name}: CUDA is not available on this machine '
                             f'(use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UsageError(f'--device {name}: this machine has {count} GPU'
                             f'{"s" if count != 1 else ""} (cuda:0 to cuda:{count - 1})')
    elif device.type != 'cpu':
        raise UsageError(f'--device {name!r} is not supported (use auto, cpu, cuda or cuda:N)')
    return device


def device_arg(text):
    """argparse `type=` of a --device flag (the benchmarks'): resolve_device(text), its refusal
    raised as argparse's, so the script exits 2 with the message alone."""
    try:
        return resolve_device(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
