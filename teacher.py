"""The teacher as the students' phase and --evaluate use it: rebuilt from its checkpoint and run
record, checked against the students' data (split and training images), and its test-set logits
computed once.

The teacher never changes after its own phase, so its predictions on a test set do not either:
they are stored beside best_teacher.pth (with the checkpoint's hash and the content digest of
the test images they belong to) when the teacher phase ends, or when a students' run or
--evaluate had to compute them, and reused by every later run on the same images.
"""
import os

import torch

from recipe import TEACHER_ARCH
from checkpoint import (CheckpointError, atomic_save, file_sha256, load_file, load_weights,
                        read_record, record_path)
from datasets import effective_subset

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


def load_teacher(args, device, num_classes):
    """(teacher module in eval mode, its architecture, sha256, record) for the students.

    Checks what needs no data (the file, its split flags but --subset, its architecture and
    class count); check_data checks the rest once the images are read. Raises CheckpointError,
    TeacherMismatch."""
    path = args.teacher_checkpoint
    if not os.path.exists(path):
        raise CheckpointError(f'no teacher checkpoint at {path}: run `python main.py '
                              f'--train-teacher` first, or pass --teacher-checkpoint')
    record = read_record(path)
    if record is not None:  # --subset is judged by check_data, as it acts on the data
        refuse_other_split(path, recorded_split(record),
                           {k: getattr(args, k) for k in SPLIT_KEYS if k != 'subset'})
    model, arch = rebuild(path, record, args.teacher_arch, DEFAULT_TEACHER_ARCH, num_classes,
                          '--teacher-arch')
    return load_for_inference(model, path, device), arch, file_sha256(path), record


def recorded_split(record):
    """{key: value} of SPLIT_KEYS in a teacher's run record (records before the dataset
    registry were CIFAR-10's)."""
    return {k: record.get(k, 'cifar10' if k == 'dataset' else None) for k in SPLIT_KEYS}


def refuse_other_split(path, recorded, split):
    """TeacherMismatch naming each flag of split ({key: value}) that recorded differs in."""
    differ = [k for k in split if recorded[k] != split[k]]
    if differ:
        details = ', '.join(f'--{k.replace("_", "-")} {recorded[k]} for the teacher but '
                            f'{split[k]} here' for k in differ)
        raise TeacherMismatch(f'the teacher {path} was trained on another split of the data '
                              f'({details}): the students would select on images the teacher '
                              f'trained on. Use the teacher\'s values, or train a teacher with '
                              f'these.')


def check_data(path, record, split, full, arrays, log):
    """Refuse a teacher that trained on other images than these students will, or held out
    others for validation.

    The students select on their validation images; a teacher that trained on them has
    memorised their labels, and its soft targets there are not what it gives unseen images. A
    teacher trained on other pictures (another copy of the data whose images differ) is not the
    teacher these students' results would describe.

    path: the teacher checkpoint (for messages); record: its run record, or None;
    split: {key: this run's value} for SPLIT_KEYS, subset already effective;
    full: the whole dataset's DatasetArrays (to read an older record's --subset as it acted);
    arrays: the DatasetArrays the students use. Raises TeacherMismatch; logs a one-line note
    when the record cannot tell.
    """
    if record is None:
        log(f'note: {record_path(path)} does not exist, so it cannot be checked that the '
            f'teacher trained on these images and held out the same validation images as '
            f'these students ({", ".join(f"{k}={v}" for k, v in split.items())})')
        return
    recorded = recorded_split(record)
    if isinstance(recorded['subset'], int):  # older records kept a --subset >= the data as given
        recorded['subset'] = effective_subset(recorded['subset'], len(full[1]), len(full[3]))
    refuse_other_split(path, recorded, split)
    trained_on = record.get('train_images_sha256')
    if trained_on is None:
        log(f'note: {record_path(path)} was written by an older version and does not record '
            f'which training images the teacher used, so it cannot be checked that they are '
            f'these ({arrays.train_sha256[:12]})')
    elif trained_on != arrays.train_sha256:
        raise TeacherMismatch(f'the teacher {path} was trained on other training images than '
                              f'these students use (sha256 {trained_on[:12]} in its record, '
                              f'{arrays.train_sha256[:12]} here): point '
                              f'--data-dir at the data it was trained on, or train a teacher '
                              f'on this data.')


# ---------------------------------------------------------------------------------------------
# Test-set logits, computed once

def logits_path(checkpoint_path):
    """best_teacher.pth -> best_teacher_test_logits.pt."""
    return os.path.splitext(checkpoint_path)[0] + '_test_logits.pt'


def logits_key(checkpoint_sha256, dataset, test_images_sha256, num_test):
    """What identifies a set of test logits: these weights (the checkpoint's sha256) on these
    test images (datasets.content_sha256 of the images and labels, and their count), normalized
    with this dataset's mean and std. Where the images were read from plays no part."""
    return {'sha256': checkpoint_sha256, 'dataset': dataset,
            'test_images_sha256': test_images_sha256, 'num_test': num_test}


def save_test_logits(checkpoint_path, logits, key):
    """Store logits (num_test x classes) beside checkpoint_path under key (logits_key's)."""
    atomic_save({'logits': logits.detach().float().cpu(), **key}, logits_path(checkpoint_path))


def store_test_logits(checkpoint_path, logits, key, log):
    """save_test_logits for logits a students' run or --evaluate had to compute: a folder that
    cannot be written costs the next run one teacher pass, so it is said, not fatal."""
    try:
        save_test_logits(checkpoint_path, logits, key)
    except OSError as e:
        log(f'note: the teacher\'s test-set logits could not be stored in '
            f'{logits_path(checkpoint_path)} ({e.strerror or e}); the next run computes them '
            f'again')
        return
    log(f'teacher: test-set logits stored in {logits_path(checkpoint_path)} for later runs on '
        f'these test images')


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
    """(the teacher's float32 logits on test_loader's images, reused): the stored ones when
    they match key, else one pass of the teacher (said in the log; progress: train.predict's
    bar; reused is then False and the caller stores them with store_test_logits once it knows
    the run goes ahead)."""
    from train import predict
    logits = cached_test_logits(checkpoint_path, key)
    if logits is not None:
        log(f'teacher: test-set logits reused from {logits_path(checkpoint_path)} (no teacher '
            f'pass over the {key["num_test"]} test images, sha256 '
            f'{key["test_images_sha256"][:12]})')
        return logits.to(test_loader.device), True
    log(f'teacher: computing its test-set logits ({key["num_test"]} images, sha256 '
        f'{key["test_images_sha256"][:12]}; no stored ones match this checkpoint and these test '
        f'images)')
    return predict(teacher, test_loader, precision, progress)[0], False
