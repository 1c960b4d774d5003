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

from kd.data.datasets import effective_subset, get_dataset
from kd.models import ArchError, build_model, model_names, source_sha256
from kd.recipes.defaults import RECIPE
from kd.recipes.base import get_recipe
from kd.files.checkpoint import (CheckpointError, WeightsMismatch, atomic_save, load_file,
                        load_weights, read_checkpoint, read_record, record_path)
from kd.engine.evaluate import predict

SPLIT_KEYS = ('dataset', 'split_seed', 'val_fraction', 'subset')  # which images are held out


class TeacherMismatch(Exception):
    """The teacher does not fit this run (another split, architecture or class count), or is not
    the finished, recorded teacher it looks like: exit 2."""


def shown(key, value):
    """A configuration value as a person reads it: no --subset means all images."""
    return 'all' if key == 'subset' and value is None else value


def recognise(state, num_classes):
    """(architecture, class count) of the registered model whose parameter names a state_dict
    has, or None; its class count when only the classifier's rows differ from num_classes."""
    for name in model_names():
        try:
            with torch.device('meta'):  # names and shapes only: nothing allocated or initialised
                reference = build_model(name, num_classes=num_classes).state_dict()
        except Exception:  # a model whose construction needs real tensors: not a candidate
            continue
        if set(reference) != set(state):
            continue
        differ = [k for k in reference if reference[k].shape != state[k].shape]
        if not differ:
            return name, num_classes
        rows = {state[k].shape[0] for k in differ if state[k].dim() >= 1}
        if len(rows) == 1 and all(reference[k].shape[0] == num_classes
                                  and reference[k].shape[1:] == state[k].shape[1:]
                                  for k in differ):
            return name, rows.pop()
    return None


def load_for_inference(model, path, device, arch=None, num_classes=None, record=None, log=None,
                       loaded=None):
    """Weights from path in eval mode, no gradients, on device (channels_last).

    arch, num_classes: what model is (registered name, classes); record: path's run record (or
    None); log: told which entry of a training checkpoint held the weights; loaded: the file's
    object when already read. Weights that do not fit are refused (CheckpointError) naming what
    the file holds: the architecture its record names, or the one its parameter names fit."""
    try:
        model = load_weights(model, path, log=log, loaded=loaded)
    except WeightsMismatch as e:
        expected = arch or type(model).__name__
        guess = recognise(e.state, num_classes) if num_classes else None
        recorded = (record or {}).get('arch')
        if recorded and recorded != expected:
            lead = f'{path} holds a {recorded} (its record says so), not a {expected}'
        elif recorded:
            lead = (f'{path} does not hold the {recorded} its record {record_path(path)} '
                    f'names (the record belongs to other weights)')
        elif guess and guess[0] != expected:
            lead = f'{path} holds the weights of a {guess[0]}, not of a {expected}'
        elif guess:
            lead = (f'{path} holds a {guess[0]} for {guess[1]} classes, but this run\'s '
                    f'dataset has {num_classes}')
        else:
            lead = f'{path} does not hold {expected} weights'
        raise CheckpointError(f'{lead}: {e.detail}') from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def rebuild(path, record, requested_arch, default_arch, num_classes, what, dataset=None,
            log=None):
    """The empty model a checkpoint's weights go into: the architecture and class count its
    record names (or the requested / default ones when it has no record). A requested
    architecture or a class count that differs from the record is refused, naming both, and so
    is an architecture string that builds nothing now (a user's file gone). log: warned when
    the user's file the architecture names has changed since the weights were trained."""
    arch = requested_arch or default_arch
    if record is not None:
        recorded = record.get('arch', default_arch)
        if requested_arch and requested_arch != recorded:
            raise TeacherMismatch(f'{path} is a {recorded} (its record {record_path(path)} says '
                                  f'so), not the {requested_arch} that {what} asks for')
        arch = recorded
        if record.get('num_classes', num_classes) != num_classes:
            trained_on = f' of {record["dataset"]}' if record.get('dataset') else ''
            here = f'{dataset} has' if dataset else 'this run\'s dataset has'
            raise TeacherMismatch(f'{path} predicts the {record["num_classes"]} classes'
                                  f'{trained_on} (its record says so), but {here} '
                                  f'{num_classes}')
    try:
        model = build_model(arch, num_classes=num_classes)
    except ArchError as e:
        raise TeacherMismatch(f'{path} is a {arch}, which cannot be built now: {e}') from None
    change = source_change(path, record, arch)
    if change and log:
        log(f'warning: {change}')
    return model, arch


def source_change(path, record, arch):
    """A sentence when the user's file that `arch` names is not the one whose content sha256
    the weights' record holds (it was edited since they were trained), else None.

    A warning, not a refusal: the weights still have to load into the changed class strictly, and
    an edit that leaves the computation as it was (a comment, a new helper) is common; what
    is computed may differ, so the run says so, and records the file it used."""
    recorded = (record or {}).get('arch_sha256')
    now = source_sha256(arch) if recorded else None
    if not recorded or now == recorded:
        return None
    return (f'{arch} is not the file {path} was trained with (sha256 {recorded[:12]} in its '
            f'record, {now[:12]} now): its weights run in the changed code')


def unfinished_run(checkpoint_path, phase):
    """The saved state of an unfinished `phase` run in checkpoint_path's folder, as
    (state file, epochs done, epochs planned), or None: while such a run exists, the best_*.pth
    beside it are that run's best so far, not finished weights. A state that cannot be read
    counts as unfinished (epochs None)."""
    state_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)),
                              f'last_{phase}.pt')
    if not os.path.exists(state_path):
        return None
    try:
        # mmap: the flag is read without reading the model and optimizer states
        state = torch.load(state_path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return state_path, None, None
    if not isinstance(state, dict) or 'finished' not in state:
        return state_path, None, None
    if state['finished']:
        return None
    return state_path, state.get('epoch'), (state.get('config') or {}).get('epochs')


def provenance_problems(path, record, sha256, phase, check_unfinished=True):
    """Why the weights in path may not be the finished ones their record describes: a list of
    sentences (empty when there is no doubt). sha256: the hash of the bytes loaded;
    check_unfinished: look for an unfinished `phase` run beside path."""
    problems = []
    unfinished = unfinished_run(path, phase) if check_unfinished else None
    if unfinished:
        state_path, done, planned = unfinished
        progress = f'epoch {done} of {planned}' if done is not None else 'unreadable'
        problems.append(f'{path} belongs to an unfinished {phase} run ({state_path}: {progress}), '
                        f'so it holds that run\'s best epoch so far, not finished weights')
    if record is not None and record.get('sha256') and record['sha256'] != sha256:
        problems.append(f'{path} is not the checkpoint its record {record_path(path)} '
                        f'describes (sha256 {sha256[:12]} on disk, {record["sha256"][:12]} '
                        f'recorded), so the file was replaced or the record comes from other '
                        f'weights')
    return problems


def load_teacher(path, device, num_classes, *, arch=None, default_arch=None, split,
                 log=lambda *_: None):
    """(teacher module in eval mode, its architecture, sha256, record) for the students.

    path: the teacher checkpoint; num_classes: the dataset's class count; arch: --teacher-arch
    (None: its record's); default_arch: the architecture of a teacher without a record (None:
    the default recipe's); split: {key: value} of SPLIT_KEYS but 'subset' (the run's dataset
    and held-out split). The sha256 is that of the bytes the weights were loaded from. Checks
    what needs no data: the file, that it is a finished teacher (no unfinished teacher run
    beside it) and the one its record describes (its hash), its split but --subset, its
    architecture and class count; check_data checks the rest once the images are read. log:
    told which entry of a training checkpoint held the weights. Raises CheckpointError,
    TeacherMismatch."""
    if not os.path.exists(path):
        raise CheckpointError(f'no teacher checkpoint at {path}: run `python main.py '
                              f'--train-teacher` first, or pass --teacher-checkpoint')
    record = read_record(path)
    loaded, sha256 = read_checkpoint(path, 'teacher checkpoint')
    problems = provenance_problems(path, record, sha256, 'teacher')
    if problems:  # the first is the cause: an unfinished run also leaves its record stale
        if unfinished_run(path, 'teacher'):
            advice = ('finish that run first (its --train-teacher command with --resume), or '
                      'point --teacher-checkpoint at a finished teacher')
        else:
            advice = (f'its record\'s split and accuracy are another teacher\'s. Train the '
                      f'teacher again, or, to use these weights without a record, remove '
                      f'{record_path(path)} (their split then goes unchecked)')
        raise TeacherMismatch(f'{problems[0]}: {advice}.')
    if record is not None and not record.get('sha256'):
        log(f'note: {record_path(path)} names no sha256, so it cannot be checked that it '
            f'describes {path}')
    if record is not None:  # --subset is judged by check_data, as it acts on the data
        refuse_other_split(path, recorded_split(record),
                           {k: v for k, v in split.items() if k != 'subset'},
                           record.get('num_classes'))
    # a teacher without a record is taken to be the recipe's teacher unless --teacher-arch says
    default_arch = default_arch or get_recipe(RECIPE).teacher_arch
    model, arch = rebuild(path, record, arch, default_arch, num_classes, '--teacher-arch',
                          dataset=split['dataset'], log=log)
    model = load_for_inference(model, path, device, arch=arch, num_classes=num_classes,
                               record=record, log=log, loaded=loaded)
    return model, arch, sha256, record


def recorded_split(record):
    """{key: value} of SPLIT_KEYS in a teacher's run record (records before the dataset
    registry were CIFAR-10's)."""
    return {k: record.get(k, 'cifar10' if k == 'dataset' else None) for k in SPLIT_KEYS}


def refuse_other_split(path, recorded, split, num_classes=None):
    """TeacherMismatch naming each flag of split ({key: value}) that recorded differs in; for
    another dataset, both datasets and their class counts (num_classes: the teacher's, from its
    record) instead, as that is the whole story."""
    if 'dataset' in split and recorded['dataset'] != split['dataset']:
        theirs, ours = recorded['dataset'], split['dataset']
        classes = num_classes or get_dataset(theirs).num_classes
        raise TeacherMismatch(
            f'the teacher {path} was trained on {theirs} ({classes} classes), these students '
            f'are for {ours} ({get_dataset(ours).num_classes} classes): a teacher\'s soft '
            f'targets are over its own classes. Train a teacher with --dataset {ours}, or run '
            f'the students with --dataset {theirs}.')
    differ = [k for k in split if recorded[k] != split[k]]
    if differ:
        details = ', '.join(f'--{k.replace("_", "-")} {shown(k, recorded[k])} for the teacher '
                            f'but {shown(k, split[k])} here' for k in differ)
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
        log(no_record_note(path, len(full[1]), split))
        return
    recorded = recorded_split(record)
    if isinstance(recorded['subset'], int):  # older records kept a --subset >= the data as given
        recorded['subset'] = effective_subset(recorded['subset'], len(full[1]), len(full[3]))
    refuse_other_split(path, recorded, split, record.get('num_classes'))
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


NO_RECORD_SPLIT = 'no record: taken as trained on every training image (no held-out split)'


def no_record_note(path, num_train, split):
    """The line a run prints for a teacher without a record (a checkpoint of the reference code,
    say): it is taken as trained on all num_train training images, as those scripts train, so
    the students' validation images were not unseen by it."""
    return (f'note: {path} has no record ({record_path(path)}), so it is taken as trained on all '
            f'{num_train} training images, as the reference code trains: the students\' '
            f'validation images (val_fraction={split.get("val_fraction")}) are not unseen by it, '
            f'so its soft targets there are those of training images; results.json records this')


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
