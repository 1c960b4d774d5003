"""Where a result was measured: library versions, the git commit, the CPU and the device."""
import os
import platform
import subprocess

import numpy as np
import torch


def versions():
    out = {'python': platform.python_version(), 'torch': torch.__version__,
           'numpy': np.__version__}
    try:
        import torchvision  # lazily: importing it costs a second in every process
        out['torchvision'] = torchvision.__version__
    except Exception:
        out['torchvision'] = None
    return out


def git_state():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', '-C', here, 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {'commit': commit or None, 'dirty': bool(dirty) if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {'commit': None, 'dirty': None}


def cpu_identity():
    """(model name, instruction-set flags) of this CPU, from /proc/cpuinfo where there is one."""
    model, flags = None, ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and model is None:
                    model = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = ' '.join(sorted(value.split()))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def device_name(device):
    """The device as results and bench figures name it: the GPU's name, or the CPU's model and
    the threads torch uses on it."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f'cpu ({cpu_identity()[0]}, {threads} thread{"s" if threads != 1 else ""})'

