"""results.json, results.md, curves.png and grid.png: each phase's record merged into one
output folder's results."""
import json
import os

from kd.files.checkpoint import atomic_write_text
from kd.report.curves import plot_curves
from kd.report.grid import plot_grid
from kd.report.labels import phase_of
from kd.report.provenance import git_state, versions
from kd.report.stats import aggregate_models, gains
from kd.report.tables import results_markdown


def read_results(out_dir):
    """OUT_DIR/results.json as a dict: {} when there is none, None when it cannot be read."""
    path = os.path.join(out_dir, 'results.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def drop_phase(results, phase):
    """A copy of results.json's dict without `phase`: its models, its entry under 'phases' and,
    for the students, their gains and teacher; the top-level config and seeds become those of
    the phase that is left (if any)."""
    results = dict(results)
    results['models'] = {n: e for n, e in results.get('models', {}).items()
                         if phase_of(n) != phase}
    phases = {p: v for p, v in results.get('phases', {}).items() if p != phase}
    results['phases'] = phases
    if phase == 'students':
        for key in ('kd_gain', 'gains', 'gains_tta', 'teacher_in_use'):
            results.pop(key, None)
    if phases:
        rest = phases[next(iter(phases))]
        results['config'], results['seeds'] = rest.get('config'), rest.get('seeds')
        if isinstance(results.get('run'), dict):
            run = results['run'] = dict(results['run'])
            run['seeds'] = rest.get('seeds')
            for key in ('subset_by_phase', 'wall_seconds'):
                if isinstance(run.get(key), dict):
                    run[key] = {p: v for p, v in run[key].items() if p != phase}
    return results


def write_results_files(out_dir, results, log=print):
    """results.json, results.md and curves.png (every phase's models) of `results`."""
    atomic_write_text(os.path.join(out_dir, 'results.json'), json.dumps(results, indent=2) + '\n')
    atomic_write_text(os.path.join(out_dir, 'results.md'), results_markdown(results))
    phases, models = results.get('phases', {}), results.get('models', {})
    folders = {n: phases[phase_of(n)]['folders'] for n in models if phase_of(n) in phases}
    # the reference line is the teacher that taught the students, wherever its checkpoint lives
    teacher_acc = (results.get('teacher_in_use') or {}).get('test_acc',
                                                            models.get('teacher', {}).get('test_acc'))
    # a recipe that keeps the last epoch (fast) is scored by it in the legend, not by its best
    keeps_last = any(((info.get('config') or {}).get('recipe_values') or {}).get('select')
                     == 'last' for info in phases.values())
    plot_curves(folders, os.path.join(out_dir, 'curves.png'), log=log, teacher_acc=teacher_acc,
                keeps_last=keeps_last)


# The configuration's content digests of the data (see kd.data.datasets.content_sha256), and
# their names
DATA_DIGESTS = (('train_images_sha256', 'training'), ('test_images_sha256', 'test'))


def _drop_other_data(results, config, out_dir, log):
    """results without the phases whose configuration names other training or test images than
    `config` (each dropped with a note through `log`)."""
    for other, entry in list(results.get('phases', {}).items()):
        changed = [what for key, what in DATA_DIGESTS
                   if key in (entry.get('config') or {}) and key in config
                   and entry['config'][key] != config[key]]
        if changed:  # its numbers describe other images: a table mixing both would be wrong
            results = drop_phase(results, other)
            log(f'note: {os.path.join(out_dir, "results.json")} held the {other} phase of a run '
                f'on other {" and ".join(changed)} images; its entries are dropped, the '
                f'{other}\'s numbers are not of this data')
    return results


def _record_gains(results, per_seed, summaries, config):
    """The students' paired gains to the baseline (single view and TTA) and the teacher they
    distilled from, set on results."""
    results['gains'] = gains(per_seed)
    results['kd_gain'] = results['gains'].get('student_kd')
    results['gains_tta'] = gains(per_seed, 'test_acc_tta')
    teacher_accs = [v['models']['teacher_in_use']['test_acc'] for v in summaries.values()]
    results['teacher_in_use'] = {'checkpoint': config.get('teacher_checkpoint'),
                                 'sha256': config.get('teacher_sha256'),
                                 'test_acc': teacher_accs[0]}


def _with_teacher_in_use(models, summaries):
    """models with the teacher row first, describing the weights these students distilled from,
    measured on their test images: the teacher phase's entry only when it is of the same
    weights."""
    used = summaries[next(iter(summaries))]['models']['teacher_in_use']
    earlier = models.get('teacher') or {}
    same = earlier.get('sha256_per_seed') == [used.get('sha256')]
    teacher = dict(earlier if same else {}, **used)
    for key in ('test_acc', 'ece'):  # measured now, once
        teacher.update({key + '_std': None, key + '_per_seed': [used.get(key)]})
    return {'teacher': teacher, **{n: e for n, e in models.items() if n != 'teacher'}}


def _phase_entry(summaries, config, folders):
    """The phase's entry under results.json's 'phases'."""
    seeds = list(summaries)
    return {
        'seeds': seeds, 'config': config,
        # training-loop time (epochs and their evaluations, summed over resumes) and this
        # invocation's wall time per seed, start-up and final evaluation included
        'train_seconds': {str(s): v['elapsed_seconds'] for s, v in summaries.items()},
        'wall_seconds': {str(s): v.get('wall_seconds') for s, v in summaries.items()},
        # the duration printed early in the run, to compare with the actual one
        'estimate': {str(s): v.get('estimate') for s, v in summaries.items()},
        'peak_memory_mb': max((v.get('peak_memory_mb') or 0) for v in summaries.values()),
        'folders': folders}


def _run_entry(phases, run_info, seeds):
    """results.json's 'run': where the data was, the device, and each phase's subset and wall
    time."""
    return {'data_dir': os.path.abspath(run_info['data_dir']),
            'subset': run_info['subset'],
            'subset_by_phase': {p: v['config'].get('subset') for p, v in phases.items()},
            'device': run_info['device'], 'seeds': seeds,
            'wall_seconds': {p: round(sum(w or 0 for w in v['wall_seconds'].values()), 2)
                             for p, v in phases.items()}}


def write_results(out_dir, phase, summaries, config, run_info, curve_dirs, log=print):
    """Merge this phase into OUT_DIR/results.json and rewrite results.md and curves.png.

    Another phase already there is kept when it ran on the same images (or cannot tell), and
    dropped, with a note, when its configuration names other training or test images.

    summaries: {seed: kd.engine.loop.train_phase's summary}; run_info: data_dir, subset, device
    name.
    """
    results = _drop_other_data(drop_phase(read_results(out_dir) or {}, phase), config, out_dir,
                               log)
    models = results['models']
    per_seed = {s: v['models'] for s, v in summaries.items()}
    models.update(aggregate_models(per_seed))
    if phase == 'students':
        _record_gains(results, per_seed, summaries, config)
        models = _with_teacher_in_use(models, summaries)
    results['models'] = models
    seeds = list(summaries)
    results['seeds'] = seeds
    results['phases'][phase] = _phase_entry(summaries, config, curve_dirs[phase])
    results['config'] = config
    results['run'] = _run_entry(results['phases'], run_info, seeds)
    results['versions'] = versions()
    results['git'] = git_state()
    write_results_files(out_dir, results, log)
    if phase == 'students':
        plot_grid(models, os.path.join(out_dir, 'grid.png'), log=log)
    return results
