"""torchrun support: process-group set-up, reductions, and BatchNorm synchronized on any backend."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init_distributed(device):
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a no-op otherwise.

    Returns (DistInfo, device), where a CUDA device becomes this process's local GPU.
    """
    if not launched_by_torchrun():
        return DistInfo(), device
    info = DistInfo(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']),
                    int(os.environ.get('LOCAL_RANK', '0')))
    if device.type == 'cuda':
        device = torch.device('cuda', info.local_rank)
        torch.cuda.set_device(device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    # A bounded timeout: a rank that died turns into an error on the others, not a hang.
    timeout = datetime.timedelta(minutes=10)
    dist.init_process_group(backend, timeout=timeout,
                            **({'device_id': device} if backend == 'nccl' else {}))
    global _cpu_group
    # Host-side flags (a stop request) go over a CPU group: reading an NCCL result would wait
    # for the GPU to finish its queued work, a stall per check.
    _cpu_group = dist.new_group(backend='gloo', timeout=timeout) if backend == 'nccl' else None
    return info, device


_cpu_group = None  # set by init_distributed when the default group is NCCL


def shutdown_distributed():
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def _active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (identity in a single process)."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_min(tensor):
    """Minimum of a tensor over ranks in place (identity in a single process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_cat(tensor):
    """Concatenate along dim 0 the tensors of all ranks, in rank order.

    The tensors may differ in length along dim 0 (a sharded evaluation batch whose size does not
    divide by the number of ranks); every rank gets the same result. Identity in one process.
    """
    if not _active():
        return tensor
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    lengths = [int(n.item()) for n in lengths]
    longest = max(lengths)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def any_rank(flag):
    """True on every rank when flag is true on any: all ranks stop at the same batch.

    A CPU tensor over a CPU (gloo) group: no device synchronisation, whatever the backend.
    """
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, group=_cpu_group)
    return bool(t.item() > 0)


def barrier():
    if _active():
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too.

    (torch.distributed.nn.functional.all_reduce does the same but is deprecated.) Every rank's
    loss depends on every rank's statistics, so the gradient reaching one rank's statistics is
    the sum of the gradients of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the global batch of all ranks.

    torch.nn.SyncBatchNorm runs on GPUs only; this one also runs with gloo on CPUs, so the
    same code path is tested here. Parameter and buffer names equal BatchNorm2d's, so
    checkpoints stay interchangeable. In a single process it is plain BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and _active()):
            return super().forward(x)
        channels = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()  # half precision: in float32
        count = torch.full((1,), xf.numel() / channels, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        stats = _AllReduceSum.apply(stats)  # backward sums the gradients over ranks too
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else \
                1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            unbiased = var.detach() * n / (n - 1).clamp_min(1)
            self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        shift = self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def sync_batchnorm_kind(device):
    """PyTorch's fused SyncBatchNorm on CUDA; SyncBatchNorm2d where PyTorch has no kernel (CPU)."""
    return nn.SyncBatchNorm if torch.device(device).type == 'cuda' else SyncBatchNorm2d


def sync_batchnorm(module, device):
    """module with its BatchNorm layers synchronized over the ranks, in the kind that fits device.

    torch.nn.SyncBatchNorm is fused and computes the variance stably (Welford); it only runs on
    CUDA. Both keep the parameters and buffers (and their names), so optimizers and checkpoints
    are unaffected.
    """
    if sync_batchnorm_kind(device) is nn.SyncBatchNorm:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_sync_batchnorm(module)


def convert_sync_batchnorm(module):
    """Replace every BatchNorm2d in module by SyncBatchNorm2d sharing its parameters and buffers.

    The tensors themselves are moved over (as torch.nn.SyncBatchNorm.convert_sync_batchnorm
    does), so their dtype, device and identity are kept: an optimizer built before the
    conversion still holds the right parameters.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device='meta')
            with torch.no_grad():
                for key, param in child.named_parameters(recurse=False):
                    setattr(sync, key, param)
                for key, buffer in child.named_buffers(recurse=False):
                    setattr(sync, key, buffer)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
