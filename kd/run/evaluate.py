"""--evaluate: the test accuracy of the checkpoints of the last run of each phase in --out-dir,
each rebuilt from its record and run in the precision its run tested it in."""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kd.data.loader import make_loaders
from kd.engine.precision import PRECISION_DTYPES, choose_precision
from kd.engine.evaluate import accuracy, predict, predict_views
from kd.files.checkpoint import read_checkpoint, read_record
from kd.recipes.base import get_recipe, recipe_names
from kd.report.tables import print_table
from kd.report.results import read_results
from kd.run.config import UsageError
from kd.run.outdir import read_manifest
from kd.run.teacher import (load_for_inference, logits_key, provenance_problems, rebuild,
                            store_test_logits, teacher_test_logits)


def checkpoint_names(out_dir):
    """The best_<name>.pth in out_dir: teacher, student_kd, student_base first, then the rest."""
    names = [f[len('best_'):-len('.pth')] for f in os.listdir(out_dir)
             if f.startswith('best_') and f.endswith('.pth')]
    first = ['teacher', 'student_kd', 'student_base']
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def last_run_models(out_dir):
    """The checkpoints --evaluate reports: those of the last run of each phase in out_dir.

    Returns ({name: that run's manifest or results.json config, or None}, notes). A phase's
    models come from its manifest run_<phase>.json; for folders written before manifests,
    from results.json's record of the phase; with neither, every best_*.pth is taken."""
    results = read_results(out_dir) or {}
    models, notes = {}, []
    for phase in ('teacher', 'students'):
        manifest = read_manifest(out_dir, phase)
        config = (results.get('phases', {}).get(phase) or {}).get('config')
        if manifest is not None:
            names, info = list(manifest['models']), manifest
            if not manifest.get('finished'):
                notes.append(f'note: the last {phase} run in {out_dir} is unfinished: its '
                             f'best_*.pth are the best epochs so far (finish it with --resume)')
        elif phase == 'teacher':
            names, info = ['teacher'], config
        elif config and config.get('students'):
            names, info = [s['name'] for s in config['students']], config
            promoted = read_record(os.path.join(out_dir, 'best_student_kd.pth')) \
                if 'student_kd' not in names else None
            if promoted and promoted.get('model') in names:  # the grid's copy of its best
                names.append('student_kd')
        else:
            names, info = [n for n in checkpoint_names(out_dir) if n != 'teacher'], None
        for name in names:
            if os.path.exists(os.path.join(out_dir, f'best_{name}.pth')):
                models[name] = info
            elif manifest is not None:
                notes.append(f'note: best_{name}.pth of the last {phase} run is not in '
                             f'{out_dir}: skipped')
    return models, notes


def test_images(subset, total):
    """Which of the `total` test images --subset `subset` takes, in words."""
    if subset and subset < total:
        return f'the first {subset} of the {total} test images'
    return f'all {total} test images'


@dataclass(frozen=True)
class Evaluation:
    """What every checkpoint --evaluate tests shares."""
    config: object                # the RunConfig
    device: torch.device
    listed: dict                  # last_run_models's {name: manifest or config, or None}
    records: dict                 # {name: its best_<name>.json, or None}
    teacher_sha256: Optional[str]  # best_teacher.pth's, when it is listed
    log: Callable


def evaluate_checkpoints(config, device, arrays, log):
    """--evaluate: test accuracy of the checkpoints of the last run of each phase in --out-dir,
    each rebuilt from its record, on the test images its run used (its record's --subset),
    unless --subset is given (then said to differ from results.md where it does)."""
    listed, notes = last_run_models(config.out_dir)
    if not listed:
        raise UsageError(f'no best_*.pth in {config.out_dir}: train first, or point --out-dir at '
                         f'the folder holding them')
    for note in notes:
        log(note)
    records = {name: read_record(os.path.join(config.out_dir, f'best_{name}.pth'))
               for name in listed}
    total, explicit = len(arrays[3]), config.subset is not None
    groups = group_by_test_set(config, listed, records, total, log)
    teacher_path = os.path.join(config.out_dir, 'best_teacher.pth')
    teacher_sha256 = (read_checkpoint(teacher_path, 'teacher checkpoint')[1]
                      if 'teacher' in listed else None)
    run = Evaluation(config, device, listed, records, teacher_sha256, log)
    models = {}
    for subset, names in groups.items():
        data = make_loaders(config.data_dir, config.batch_size, device, 0.0, config.seeds[0],
                            subset, eval_batch_size=1000, channels_last=True, arrays=arrays,
                            dataset=config.dataset)
        log(f'Test set: {data.num_test} images, {test_images(subset, total)}'
            + (' (--subset)' if explicit else ', as in the runs that trained these checkpoints')
            + (f': {", ".join(names)}' if len(groups) > 1 else ''))
        for name in names:
            models[name] = evaluate_one(run, name, data)
    print_table(models, log)
    return models


def group_by_test_set(config, listed, records, total, log):
    """{--subset: [names]}: the checkpoints `listed` grouped by the test images they are tested
    on, each on its run's (its record's --subset) unless --subset is given, then all on those
    (said where they differ from its run's). total: the dataset's test images."""
    trained_on = {name: (records[name] or info or {}).get('subset', config.subset)
                  for name, info in listed.items()}
    explicit = config.subset is not None
    differ = sorted({s for s in trained_on.values()  # compared as the images they take
                     if test_images(s, total) != test_images(config.subset, total)}, key=str) \
        if explicit else []
    if differ:
        runs = ' and '.join(test_images(s, total) for s in differ)
        log(f'note: --subset {config.subset}: these accuracies are on other test images '
            f'than results.md\'s (the runs that trained these checkpoints used {runs})')
    groups = {}
    for name in listed:
        groups.setdefault(config.subset if explicit else trained_on[name], []).append(name)
    return groups


def evaluate_one(run, name, data):
    """best_<name>.pth rebuilt, checked and tested on data.test: its table row."""
    config, log, record = run.config, run.log, run.records[name]
    path = os.path.join(config.out_dir, f'best_{name}.pth')
    is_teacher = name == 'teacher'
    # the recipe that trained it decides its evaluation (test-time augmentation)
    recorded = (record or {}).get('recipe')
    recipe = get_recipe(recorded if recorded in recipe_names() else config.recipe.name)
    model, arch = rebuild(path, record, config.teacher_arch if is_teacher else config.student_arch,
                          recipe.teacher_arch if is_teacher else recipe.student_arch,
                          config.num_classes, '--teacher-arch' if is_teacher else '--student-arch',
                          dataset=config.dataset, log=log)
    loaded, sha256 = read_checkpoint(path, f'{type(model).__name__} checkpoint')
    # the accuracy below is that of these weights, whatever their record or folder say (a
    # manifest has said already whether its run is unfinished)
    manifest = isinstance(run.listed[name], dict) and 'finished' in run.listed[name]
    for problem in provenance_problems(path, record, sha256,
                                       'teacher' if is_teacher else 'students',
                                       check_unfinished=not manifest):
        log(f'note: {problem}')
    for problem in evaluation_differences(name, record, data.arrays.test_sha256,
                                          run.teacher_sha256):
        log(f'note: {problem}')
    model = load_for_inference(model, path, run.device, arch=arch,
                               num_classes=config.num_classes, record=record, log=log,
                               loaded=loaded)
    precision = evaluation_precision(record, is_teacher, run.device, config.amp, log)
    bar = f'evaluate {name}'
    if is_teacher:
        key = logits_key(sha256, config.dataset, data.arrays.test_sha256, data.num_test)
        logits, reused = teacher_test_logits(model, path, key, data.test, precision, log, bar)
        if not reused:
            store_test_logits(path, logits, key, log)
    else:
        logits = predict(model, data.test, precision, bar)[0]
    row = {'test_acc': accuracy(logits, data.test.labels), 'arch': arch,
           'params': sum(p.numel() for p in model.parameters())}
    if recipe.tta != 'none':
        tta = predict_views(model, data.test, precision, progress=f'{bar} (TTA)')[1]
        row['test_acc_tta'] = accuracy(tta, data.test.labels)
    return row


def evaluation_precision(record, is_teacher, device, amp, log):
    """The autocast dtype --evaluate runs a checkpoint in: --amp / --no-amp when given, else
    the precision its run tested it in (its record's, said in one line when it is not the
    rule's), else choose_precision's rule. Rounding differs between precisions, so only the
    recorded one reproduces the run's test accuracy."""
    rule = choose_precision('teacher' if is_teacher else 'student', device, amp)
    recorded = (record or {}).get('precision')
    if amp is not None or recorded not in PRECISION_DTYPES:
        return rule
    dtype = PRECISION_DTYPES[recorded]
    if dtype == torch.float16 and device.type != 'cuda':
        return rule
    if dtype != rule:
        log(f'precision: {recorded}, as its run tested it (--amp / --no-amp choose another)')
    return dtype


def evaluation_differences(name, record, test_sha256, teacher_sha256):
    """What makes --evaluate's numbers for best_<name>.pth differ in meaning from its run's
    (sentences): test images other than those its run was tested on (by content digest), or,
    for a student, a best_teacher.pth beside it other than the teacher it was distilled from."""
    if not record:
        return []
    out = []
    tested = record.get('test_images_sha256')
    if tested and tested != test_sha256:
        out.append(f'best_{name}.pth: these test images differ from those its run was tested on '
                   f'(test digest {tested[:12]} recorded, {test_sha256[:12]} here), so its '
                   f'accuracy here is not comparable with results.md')
    taught = record.get('teacher_sha256')
    if name != 'teacher' and teacher_sha256 and taught and taught != teacher_sha256:
        out.append(f'best_{name}.pth was distilled from another teacher (sha256 {taught[:12]}) '
                   f'than the best_teacher.pth here ({teacher_sha256[:12]}): a teacher retrained '
                   f'in this folder sets the earlier one aside under previous/')
    return out
