"""Resuming: the saved training states of a run's folders, whether they may be resumed (the same
configuration, the same images, a precision the run can keep), and the line a resumed seed prints."""
import os
import time  # wall-clock stamps only (when a state was saved)

from kd.engine.state import STATE_FORMAT
from kd.files.checkpoint import load_file
from kd.run.config import UsageError

# Configuration keys that change what a run computes: a resumed run must agree on all of them.
RUN_KEYS = {
    'teacher': ('dataset', 'teacher_arch', 'epochs', 'batch_size', 'lr', 'weight_decay', 'seed',
                'val_fraction', 'split_seed', 'subset', 'precision', 'recipe',
                'teacher_arch_sha256'),
    'students': ('dataset', 'student_arch', 'students', 'epochs', 'batch_size', 'lr',
                 'weight_decay', 'seed', 'val_fraction', 'split_seed', 'subset', 'precision',
                 'teacher_sha256', 'recipe', 'student_arch_sha256', 'teacher_arch_sha256',
                 'student_points', 'teacher_points'),
}


def run_dirs(out_dir, seeds, per_seed_folders):
    return {s: (os.path.join(out_dir, f'seed{s}') if per_seed_folders else out_dir) for s in seeds}


def load_states(phase, dirs):
    """{seed: (path, state)} of the saved training states in the run folders, each read once."""
    states = {}
    for seed, d in dirs.items():
        path = os.path.join(d, f'last_{phase}.pt')
        if not os.path.exists(path):
            continue
        state = load_file(path, 'training state')
        if not isinstance(state, dict) or 'config' not in state or 'finished' not in state:
            raise UsageError(f'{path} is not a training state of this program; '
                             f'remove it or use --restart')
        states[seed] = (path, state)
    return states


def find_states(phase, saved, resume, restart, config_by_seed):
    """The saved state of each seed for --resume, or a refusal to overwrite an unfinished run.

    saved: load_states's result; resume, restart: --resume, --restart. Needs no timing, so it
    runs before any: the precision is compared only when config_by_seed has one (--amp /
    --no-amp); in auto mode a resumed run takes its saved precision (saved_precisions)."""
    states = {}
    for seed, (path, state) in saved.items():
        if not state['finished'] and not resume and not restart:
            raise UsageError(
                f"{path} holds an unfinished {phase} run (epoch {state['epoch']} of "
                f"{state['config'].get('epochs')}). Resume it with --resume, or start over "
                f"with --restart.")
        if resume:
            if state.get('format') != STATE_FORMAT:
                raise UsageError(f'{path} was saved by an older version of this program and '
                                 f'cannot be resumed; start over with --restart')
            new = config_by_seed[seed]
            # states saved before recipes existed ran the standard one
            changed = [k for k in RUN_KEYS[phase] if (k != 'precision' or k in new)
                       and state['config'].get(k, 'standard' if k == 'recipe' else None)
                       != new.get(k)]
            if changed:
                details = '; '.join(describe_change(k, state['config'].get(k), new.get(k))
                                    for k in changed)
                raise UsageError(f'cannot resume {path}: the configuration changed ({details}); '
                                 f'use the original flags, or --restart to start over')
            states[seed] = state
    return states


def describe_change(key, before, after):
    """One configuration key's change, in words: the students' by name and setting (a student
    whose loss or settings changed, or which students come or go), any other as
    'key: old -> new'."""
    if key != 'students' or not isinstance(before, list) or not isinstance(after, list):
        return f'{key}: {before!r} -> {after!r}'
    if len(before) == len(after):   # the same grid with other values: student by student
        parts = [_student_change(a, b) for a, b in zip(before, after) if a != b]
    else:
        old, new = [s.get('name') for s in before], [s.get('name') for s in after]
        parts = [f'{verb}: {", ".join(names)}' for verb, names in (
            ('students no longer trained', [n for n in old if n not in new]),
            ('new students', [n for n in new if n not in old])) if names]
    return '; '.join(parts) or f'{key}: {before!r} -> {after!r}'


def _student_change(a, b):
    """'kd_T4_a0.1 -> kd_T4_a0.5 (alpha: 0.1 -> 0.5)': one student's name, loss and settings
    before and after."""
    pa, pb = a.get('params') or {}, b.get('params') or {}
    changes = [f"loss: {a.get('loss')!r} -> {b.get('loss')!r}"] if a.get('loss') != b.get('loss') \
        else []
    changes += [f'{k}: {pa.get(k)!r} -> {pb.get(k)!r}' for k in dict.fromkeys([*pa, *pb])
                if pa.get(k) != pb.get(k)]
    name = a.get('name')
    if b.get('name') != name:
        name = f"{name} -> {b.get('name')}"
    return f'{name} ({", ".join(changes)})'


def check_resume_data(saved, arrays, log):
    """Refuse to resume a run on other images than it started on (UsageError, exit 2).

    saved: load_states's result; arrays: the DatasetArrays this invocation uses (after
    --subset). The images are compared by content digest, so a copy of the data in another
    folder resumes, and other pictures under the same path do not. A state written without the
    digests (an older version) gets a one-line note."""
    now = {'train_images_sha256': arrays.train_sha256, 'test_images_sha256': arrays.test_sha256}
    for path, state in saved.values():
        config = state['config']
        if not any(k in config for k in now):
            log(f'note: {path} was saved by an older version that did not record its images\' '
                f'digests, so it cannot be checked that it resumes on the same data')
            continue
        differ = [f'{what} images (sha256 {str(config.get(k))[:12]} saved, {now[k][:12]} now)'
                  for k, what in (('train_images_sha256', 'training'),
                                  ('test_images_sha256', 'test')) if config.get(k) != now[k]]
        if differ:
            raise UsageError(f'cannot resume {path}: it was started on other data (its '
                             f'{" and ".join(differ)}); point --data-dir at the data it was '
                             f'started on (any folder holding the same files), or --restart to '
                             f'start over')


def saved_precisions(saved, resume):
    """(precisions, teacher precision, record) of a run to be resumed, by name: a resumed run
    keeps its own, whatever was stored or measured since. None when not resuming (resume:
    --resume)."""
    if not resume:
        return None
    for _, state in saved.values():
        config = state['config']
        if 'precision' in config:
            source = config.get('precision_source') or 'unrecorded'
            if not source.startswith('resumed'):
                source = f'resumed ({source})'
            return (config['precision'], config.get('teacher_precision'),
                    {'source': source, 'decisions': config.get('precision_decisions')})
    return None


def resumed_amp(saved, amp):
    """The --amp setting a resumed run records: the one it started with when amp is None
    (auto), else amp, once it agrees with the precision the run trained in.

    A resumed run keeps its precision, so an explicit --amp (bf16 / fp16) on a run that trained
    any model in fp32, or --no-amp on one that used a lower precision, would be recorded but
    not run: UsageError, naming the saved precision. saved: load_states's result.
    """
    started = amp
    for path, state in saved.values():
        config = state['config']
        if 'precision' not in config:
            continue
        used = set(config['precision'].values()) | (
            {config['teacher_precision']} if config.get('teacher_precision') else set())
        if (amp is True and 'fp32' in used) or (amp is False and used != {'fp32'}):
            raise UsageError(
                f"cannot resume {path} with --{'' if amp else 'no-'}amp: that run trained in "
                f"{' and '.join(sorted(used))}, and a resumed run keeps its precision; resume "
                f"without --{'' if amp else 'no-'}amp, or start over with --restart")
        if amp is None:
            started = config.get('amp')
    return started


def describe_resume(seed, path, state, steps_per_epoch):
    """The line a resumed seed prints: where it continues and when its state was saved."""
    saved = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(os.path.getmtime(path)))
    epochs = state['config'].get('epochs')
    if state['finished']:
        return (f'seed {seed}: finished all {epochs} epochs already (state saved {saved} in '
                f'{path}); nothing to train')
    return (f"resuming seed {seed} from epoch {state['epoch'] + 1} of {epochs}, batch "
            f"{state['batch'] + 1} of {steps_per_epoch} (state saved {saved} in {path})")
