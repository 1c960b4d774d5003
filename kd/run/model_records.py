"""What a seed writes beside its weights: best_<name>.json records, the grid's best student
promoted to best_student_kd, and the record of the teacher the students learned from."""
import os
import shutil

from kd.files.checkpoint import file_sha256, write_record
from kd.run.specs import distilled_names
from kd.run.teacher import NO_RECORD_SPLIT


def teacher_in_use(checkpoint, teacher):
    """What describes the students' teacher besides its accuracy on this run's test images:
    its checkpoint (path), hash, architecture and size, and the selection its record (whose
    hash was checked against the weights loaded) reports. teacher: a record.TeacherInfo."""
    record = teacher.record or {}
    return {'checkpoint': checkpoint, 'sha256': teacher.sha256,
            'arch': teacher.arch, 'params': teacher.params,
            'seeds': [record['seed']] if 'seed' in record else [],
            **({} if teacher.record else {'split': NO_RECORD_SPLIT}),
            **{k: record[k] for k in ('best_epoch', 'best_val_acc') if k in record}}


def write_model_records(run_dir, specs, models, config):
    """best_<name>.json beside each best_<name>.pth: what the weights are (architecture, class
    count, loss) and which data selected them, so later phases can rebuild and check them.
    Returns {name: sha256 of its checkpoint}."""
    hashes = {}
    for spec in specs:
        path = os.path.join(run_dir, f'best_{spec.name}.pth')
        entry = models.get(spec.name, {})
        if not os.path.exists(path):
            continue
        hashes[spec.name] = file_sha256(path)
        write_record(path, {
            'model': spec.name, 'arch': spec.arch, 'num_classes': config['num_classes'],
            'loss': spec.loss, 'loss_params': spec.params, 'seed': config['seed'],
            **{k: config.get(k) for k in ('dataset', 'split_seed', 'val_fraction', 'subset',
                                          'val_images_sha256', 'train_images_sha256',
                                          'test_images_sha256', 'epochs', 'recipe')},
            'best_epoch': entry.get('best_epoch'), 'best_val_acc': entry.get('best_val_acc'),
            'test_acc': entry.get('test_acc'), 'sha256': hashes[spec.name],
            # the precision it trained and was tested in: --evaluate reproduces test_acc with it
            **({'precision': entry['precision']} if entry.get('precision') else {}),
            **({'teacher_sha256': config['teacher_sha256']} if 'teacher_sha256' in config else {}),
            **arch_source(spec, config),
        })
    return hashes


def arch_source(spec, config):
    """{'arch_sha256': the content of the user's file its architecture names, as the run read
    it} for a model of a user's file ({} otherwise): --evaluate and later phases compare it."""
    key = 'teacher_arch_sha256' if spec.name == 'teacher' else 'student_arch_sha256'
    return {'arch_sha256': config[key]} if config.get(key) else {}


def promote_best_student(run_dir, specs, models, log):
    """With several distilled students, best_student_kd.pth is the one best on validation."""
    names = distilled_names(specs)
    if len(names) < 2:
        return None
    best = max(names, key=lambda n: (models[n].get('best_val_acc') or -1.0,
                                     -names.index(n)))
    for ext in ('.pth', '.json'):
        shutil.copyfile(os.path.join(run_dir, f'best_{best}{ext}'),
                        os.path.join(run_dir, f'best_student_kd{ext}'))
    log(f'best_student_kd.pth is {best}, the distilled student best on validation')
    return best
