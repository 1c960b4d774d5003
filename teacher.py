"""The teacher as the students' phase and --evaluate use it: rebuilt from its checkpoint and run
record, checked against the students' data split, and its test-set logits computed once.

The teacher never changes after its own phase, so its predictions on the test set do not either:
they are stored beside best_teacher.pth when the teacher phase ends (with the checkpoint's hash
and the data they belong to) and reused by every students' run, every seed and --evaluate.
"""
import os

import torch

from recipe import TEACHER_ARCH
from checkpoint import (CheckpointError, atomic_save, file_sha256, load_file, load_weights,
                        read_record, record_path)

SPLIT_KEYS = ('dataset', 'split_seed', 'val_fraction', 'subset')  # which images are held out
DEFAULT_TEACHER_ARCH = TEACHER_ARCH


class TeacherMismatch(Exception):
    """The teacher does not fit this run (another split, architecture or class count): exit 2."""


def load_for_inference(model, path, device):
    """Weights from path (refused with a clear message if wrong) in eval mode, no gradients."""
    model = load_weights(model, path).to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def rebuild(path, record, requested_arch, default_arch, num_classes, what):
    """The empty model a checkpoint's weights go into: the architecture and class count its
    record names (or the requested / default ones when it has no record). A requested
    architecture or a class count that differs from the record is refused, naming both."""
    from models import build_model
    arch = requested_arch or default_arch
    if record is not None:
        recorded = record.get('arch', default_arch)
        if requested_arch and requested_arch != recorded:
            raise TeacherMismatch(f'{path} is a {recorded} (its record {record_path(path)} says '
                                  f'so), not the {requested_arch} that {what} asks for')
        arch = recorded
        if record.get('num_classes', num_classes) != num_classes:
            raise TeacherMismatch(f'{path} has {record["num_classes"]} classes, but this run\'s '
                                  f'dataset has {num_classes}')
    return build_model(arch, num_classes=num_classes), arch


def load_teacher(args, device, num_classes, log):
    """(teacher module in eval mode, its architecture, sha256, record) for the students."""
    path = args.teacher_checkpoint
    if not os.path.exists(path):
        raise CheckpointError(f'no teacher checkpoint at {path}: run `python main.py '
                              f'--train-teacher` first, or pass --teacher-checkpoint')
    record = read_record(path)
    check_split(args, record, log)
    model, arch = rebuild(path, record, args.teacher_arch, DEFAULT_TEACHER_ARCH, num_classes,
                          '--teacher-arch')
    return load_for_inference(model, path, device), arch, file_sha256(path), record


def check_split(args, record, log):
    """Refuse a teacher that held out other images than these students will.

    The students select on their validation images; a teacher that trained on them has
    memorised their labels, and its soft targets there are not what it gives unseen images.
    """
    path = args.teacher_checkpoint
    if record is None:
        log(f'note: {record_path(path)} does not exist, so it cannot be checked that the '
            f'teacher held out the same validation images as these students '
            f'({", ".join(f"{k}={getattr(args, k)}" for k in SPLIT_KEYS)})')
        return
    differ = [k for k in SPLIT_KEYS if record.get(k, 'cifar10' if k == 'dataset' else None)
              != getattr(args, k)]
    if differ:
        details = ', '.join(f'--{k.replace("_", "-")} {record.get(k)} for the teacher but '
                            f'{getattr(args, k)} here' for k in differ)
        raise TeacherMismatch(f'the teacher {path} was trained on another split of the data '
                              f'({details}): the students would select on images the teacher '
                              f'trained on. Use the teacher\'s values, or train a teacher with '
                              f'these.')


# ---------------------------------------------------------------------------------------------
# Test-set logits, computed once

def logits_path(checkpoint_path):
    """best_teacher.pth -> best_teacher_test_logits.pt."""
    return os.path.splitext(checkpoint_path)[0] + '_test_logits.pt'


def logits_key(checkpoint_sha256, dataset, subset, num_test):
    """What identifies a set of test logits: these weights on these test images."""
    return {'sha256': checkpoint_sha256, 'dataset': dataset, 'subset': subset,
            'num_test': num_test}


def save_test_logits(checkpoint_path, logits, key):
    atomic_save({'logits': logits.detach().float().cpu(), **key}, logits_path(checkpoint_path))


def cached_test_logits(checkpoint_path, key):
    """The stored logits when they belong to exactly these weights and test images, else None."""
    path = logits_path(checkpoint_path)
    if not os.path.exists(path):
        return None
    try:
        stored = load_file(path, 'file of teacher logits')
    except CheckpointError:
        return None  # damaged: recomputed
    if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in key.items()):
        return None
    logits = stored.get('logits')
    if not torch.is_tensor(logits) or logits.shape[0] != key['num_test']:
        return None
    return logits


def teacher_test_logits(teacher, checkpoint_path, key, test_loader, precision, log,
                        progress=None):
    """The teacher's float32 logits on test_loader's images: stored ones when they match, else
    one pass of the teacher (said in the log; progress: train.predict's bar)."""
    from train import predict
    logits = cached_test_logits(checkpoint_path, key)
    if logits is not None:
        log(f'teacher: test-set logits reused from {logits_path(checkpoint_path)} (no teacher '
            f'pass over the {key["num_test"]} test images)')
        return logits.to(test_loader.device)
    log(f'teacher: computing its test-set logits ({key["num_test"]} images; no stored ones '
        f'match this checkpoint and test set)')
    return predict(teacher, test_loader, precision, progress)[0]
