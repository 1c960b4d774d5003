"""Checkpoints: atomic writes, weights-only loading with clear refusals, and RNG state capture."""
import os
import random
import tempfile

import numpy as np
import torch

WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class CheckpointError(Exception):
    """A checkpoint file is missing, not a checkpoint, or of another model."""


def current_umask():
    """The process's file-mode creation mask.

    Python can read it only by setting it: 0o077 meanwhile, so a file another thread creates in
    that instant gets fewer permissions, never more.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, fsync it, then os.replace it into place.

    A crash at any instant leaves either the old file or the complete new one, never a torn one.
    The file gets the mode open() would give a new file (0o666 & ~umask, 0644 under umask 022).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                               dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            # mkstemp creates its file 0600 whatever the umask, and the rename keeps that mode
            try:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            except OSError:  # a file system without permissions (FAT, some shares): its own
                pass
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def file_sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj, path):
    """torch.save(obj, path), atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def unwrap(model):
    """The plain nn.Module behind DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def plain_state_dict(model):
    """state_dict with CPU tensors and no module./_orig_mod. prefixes: loads anywhere."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def strip_prefixes(state_dict):
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_file(path, what='checkpoint'):
    """torch.load(path, weights_only=True) onto the CPU, with every failure as CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f'{path} does not exist')
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a {what}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # garbage, truncated, or a pickle that would run code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'{path} is not a {what} that can be loaded safely '
                              f'({type(e).__name__}: {reason[:200]})') from None


def load_weights(model, path):
    """Load a plain state_dict from path into model, or refuse naming the file and the model."""
    expected = type(unwrap(model)).__name__
    state = load_file(path, f'{expected} checkpoint')
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f'{path} is not a {expected} checkpoint (expected a state_dict '
                              f'of tensors, found {type(state).__name__})')
    try:
        unwrap(model).load_state_dict(strip_prefixes(state), strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[0]
        raise CheckpointError(f'{path} is not a {expected} checkpoint: its weights do not fit '
                              f'{expected} ({detail[:200]})') from None
    return model


# ---------------------------------------------------------------------------------------------
# Random-number state, in a form that loads with weights_only=True (tensors and plain types)

def capture_rng_state():
    """The global generators' states. Training draws its order and augmentation from
    (seed, epoch) generators, not from these, so only this process's own generators are kept:
    for CUDA the current device's alone, which lets a run resume on another number of GPUs."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda_device'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    """Restore what capture_rng_state saved, whatever GPUs this machine has.

    A saved CUDA state is restored on the current device when there is one; states saved by
    older versions list every visible GPU ('cuda'), of which the current device's is taken if
    it exists. A CPU machine, or fewer GPUs than were saved, is not an error.
    """
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if not torch.cuda.is_available():
        return
    cuda_state = state.get('cuda_device')
    if cuda_state is None and state.get('cuda'):
        index = torch.cuda.current_device()
        cuda_state = state['cuda'][index] if index < len(state['cuda']) else None
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)


# ---------------------------------------------------------------------------------------------
# The run record beside a checkpoint: what it is and which data it was selected on

def record_path(checkpoint_path):
    """best_teacher.pth -> best_teacher.json."""
    return os.path.splitext(checkpoint_path)[0] + '.json'


def write_record(checkpoint_path, record):
    import json
    atomic_write_text(record_path(checkpoint_path), json.dumps(record, indent=2) + '\n')


def read_record(checkpoint_path):
    """The record written beside checkpoint_path, or None when there is none."""
    import json
    path = record_path(checkpoint_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable run record ({e}); remove it or train '
                              f'the checkpoint again') from None
    if not isinstance(record, dict):
        raise CheckpointError(f'{path} is not a run record (holds a {type(record).__name__})')
    return record
