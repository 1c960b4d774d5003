"""Memory: what a run's models will need before it starts, and what the process used at its peak.

Many students share one device in a grid; a grid that cannot fit is refused before training
(with the number of students that can), not after an out-of-memory error an hour in.
"""
import os
import resource

import torch

from kd.models import build_model


class GridTooLarge(Exception):
    """The models of a run do not fit the device's free memory: exit 2."""


def bytes_per_student(arch, num_classes, batch_shape):
    """About how much memory one student takes while training: weights, gradients and momentum
    (3 copies of the parameters) plus the activations autograd keeps for one batch (every
    layer's output, in float32: an upper bound under autocast)."""
    model = build_model(arch, num_classes=num_classes)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros((1,) + tuple(batch_shape[1:])))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    return 4 * (3 * params + sum(outputs) * batch_shape[0])


def available_bytes(device):
    """Free memory on the device: the GPU's free memory, or the machine's available RAM."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def check_memory(specs, device, num_classes, batch_shape, log, extra=None):
    """Say how much memory the models need; refuse (GridTooLarge), before training, a grid that
    cannot fit, with the number of models that can. extra: {model name: bytes} a model needs
    beside the network (its feature method's connectors and memories). Returns the estimate in
    bytes."""
    per_student = bytes_per_student(specs[0].arch, num_classes, batch_shape)
    free = available_bytes(device)
    methods = sum((extra or {}).values())
    need = per_student * len(specs) + methods
    log(f'memory: about {per_student / 2**20:.0f} MB per model, {need / 2**20:.0f} MB for '
        f'{len(specs)}' + (f' with their methods\' {methods / 2**20:.0f} MB' if methods else '')
        + f'; {free / 2**20:.0f} MB free on {device.type}')
    if need > 0.9 * free:
        fits = max(0, int(0.9 * free // (need / len(specs))))
        raise GridTooLarge(f'{len(specs)} models of {specs[0].arch} need about {need / 2**30:.1f} '
                         f'GB, but {device.type} has {free / 2**30:.1f} GB free: it holds about '
                         f'{fits}. Use fewer --loss / --temperature / --alpha values, or a '
                         f'smaller --batch-size.')
    return need


def peak_memory_mb(device):
    """The process's peak memory so far: the GPU's allocations, or the resident set size."""
    if device.type == 'cuda':
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
