"""Checkpoints: atomic writes, weights-only loading with clear refusals, and RNG state capture."""
import argparse
import hashlib
import io
import json
import os
import random
import tempfile
import warnings

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from kd.files.load_errors import load_failure_reason

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
    """A copy of state_dict without the module. (DataParallel, DDP) and _orig_mod.
    (torch.compile) prefixes, however nested, that other tools leave on parameter names."""
    out = dict(state_dict)
    while any(k.startswith(WRAPPER_PREFIXES) for k in out if isinstance(k, str)):
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(out, prefix)
    return out


# Keys under which training scripts store the weights beside other things: RepDistiller and
# mdistiller save {'epoch', 'model', 'best_acc', 'optimizer'}, others 'state_dict' or 'net'.
WEIGHT_KEYS = ('model', 'state_dict', 'model_state_dict', 'net', 'weights', 'params')


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and \
        all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _describe(obj):
    """What a loaded object is, in a few words: its top-level keys for a dict."""
    if isinstance(obj, dict):
        if not obj:
            return 'an empty dict'
        keys = [repr(k) for k in list(obj)[:8]]
        return f"a dict with the keys {', '.join(keys)}" + (', ...' if len(obj) > 8 else '')
    if torch.is_tensor(obj):
        return f'a single tensor of shape {list(obj.shape)}'
    return f'a {type(obj).__name__}'


def find_state_dict(obj):
    """(state_dict, key) in a loaded checkpoint: obj itself when it is a state_dict (key None),
    else the first of WEIGHT_KEYS (then any other entry) that holds one. None when there is
    none."""
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        keys = [k for k in WEIGHT_KEYS if k in obj] + [k for k in obj if k not in WEIGHT_KEYS]
        for key in keys:
            if _is_state_dict(obj[key]):
                return obj[key], key
    return None


def _check_path(path, what):
    if not os.path.exists(path):
        raise CheckpointError(f'{path} does not exist')
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a {what}')


def _torch_load(source, path, what):
    """torch.load(source, weights_only=True) onto the CPU; every failure a CheckpointError."""
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": the refusal below says what matters, once
            warnings.simplefilter('ignore', UserWarning)
            # RepDistiller's checkpoints also hold its argparse options: plain attributes
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(source, map_location='cpu', weights_only=True)
    except Exception as e:  # garbage, truncated, or a pickle that would run code
        raise CheckpointError(f'cannot load {path} as a {what}: '
                              f'{load_failure_reason(path, e)}') from None


def load_file(path, what='checkpoint'):
    """torch.load(path, weights_only=True) onto the CPU, with every failure as CheckpointError
    naming the file and the reason (an empty, text, truncated or foreign file; the global a
    pickle would import)."""
    _check_path(path, what)
    return _torch_load(path, path, what)


def read_checkpoint(path, what='checkpoint'):
    """(object, sha256 hex digest) of the file at path from one read of its bytes, so the hash
    is that of exactly what was loaded. Refusals as load_file's."""
    _check_path(path, what)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f'{path} cannot be read: {e.strerror or e}') from None
    return _torch_load(io.BytesIO(data), path, what), hashlib.sha256(data).hexdigest()


class WeightsMismatch(CheckpointError):
    """A state_dict whose names or shapes do not fit the model. detail: the differences in
    words; state: the file's state_dict (prefixes stripped); missing and unexpected keys
    (sorted lists of str) and shape mismatches [(key, file shape, model shape)]."""

    def __init__(self, message, detail, state, missing, unexpected, mismatched):
        super().__init__(message)
        self.detail, self.state = detail, state
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _examples(keys, n=2):
    return ', '.join(keys[:n]) + (', ...' if len(keys) > n else '')


def describe_mismatch(model_state, file_state, expected):
    """(text, missing, unexpected, mismatched): how a state_dict differs from a model's."""
    missing = sorted(set(model_state) - set(file_state))
    unexpected = sorted(set(file_state) - set(model_state))
    mismatched = [(k, list(file_state[k].shape), list(model_state[k].shape))
                  for k in model_state if k in file_state
                  and file_state[k].shape != model_state[k].shape]
    parts = []
    if missing:
        parts.append(f'{len(missing)} of {expected}\'s {len(model_state)} keys are missing '
                     f'(e.g. {_examples(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} keys are not {expected}\'s (e.g. '
                     f'{_examples(unexpected)})')
    if mismatched:
        key, in_file, in_model = mismatched[0]
        parts.append(f'{len(mismatched)} tensor{"s differ" if len(mismatched) > 1 else " differs"}'
                     f' in shape (e.g. {key}: {"x".join(map(str, in_file)) or "scalar"} in the '
                     f'file, {"x".join(map(str, in_model)) or "scalar"} in {expected})')
    return '; '.join(parts), missing, unexpected, mismatched


def load_weights(model, path, log=None, loaded=None):
    """Load the weights in path into model, or refuse naming the file and the model.

    The file may hold a plain state_dict or a training checkpoint that wraps one (RepDistiller,
    mdistiller: {'epoch', 'model', 'best_acc', ...}; others 'state_dict', 'net'), with or
    without module./_orig_mod. prefixes; log (a print-like callable) is told which key was used.
    loaded: the file's object when the caller has read it already (read_checkpoint).
    Raises CheckpointError when the file holds no state_dict (naming its top-level keys), and
    WeightsMismatch when the weights do not fit (key counts and examples, shapes)."""
    expected = type(unwrap(model)).__name__
    obj = load_file(path, f'{expected} checkpoint') if loaded is None else loaded
    if isinstance(obj, dict) and {'config', 'finished', 'format'} <= set(obj):
        # it holds model states among others, but which and when is the resume's business
        raise CheckpointError(f'{path} is a training state of this program (what --resume '
                              f'continues from), not a checkpoint of weights: use the '
                              f'best_<model>.pth beside it')
    found = find_state_dict(obj)
    if found is None:
        raise CheckpointError(f'{path} holds no weights to load into {expected}: it is '
                              f'{_describe(obj)}, and none of its entries is a state_dict of '
                              f'tensors')
    state, key = found
    if key is not None and log is not None:
        others = [k for k in obj if k != key]
        log(f'{path}: the weights are its {key!r} entry (it also holds '
            f'{", ".join(map(repr, others[:6]))}{", ..." if len(others) > 6 else ""})'
            if others else f'{path}: the weights are its {key!r} entry')
    state = strip_prefixes(state)
    target = unwrap(model)
    model_state = target.state_dict()
    text, missing, unexpected, mismatched = describe_mismatch(model_state, state, expected)
    if text:
        raise WeightsMismatch(f'{path} does not hold {expected} weights: {text}', text, state,
                              missing, unexpected, mismatched)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names and shapes fit, yet loading failed (dtype, extra state)
        detail = ' '.join(str(e).split())
        raise CheckpointError(f'{path} does not load into {expected}: {detail}') from None
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
    atomic_write_text(record_path(checkpoint_path), json.dumps(record, indent=2) + '\n')


def read_record(checkpoint_path):
    """The record written beside checkpoint_path, or None when there is none."""
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
