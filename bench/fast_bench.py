"""The fast recipe's whole workflow, as a user runs it, timed process by process.

    python bench/fast_bench.py --data-dir DIR [--device cpu] [--seeds 0 1 2]
        [--temperature 2 4 8] [--alpha 0.1 0.5] [--subset N] [--epochs N] [--skip ...]
        [--work-dir DIR] [--json bench/fast_results.json] [--main-flags=--no-amp]

Each step is one fresh `python main.py --recipe fast ...` subprocess from the repository root,
timed from its start to its exit in wall seconds (imports, data reading, precision choice,
training, evaluation and writing included):

(a) teacher, --val-fraction 0 (all training images, the last epoch kept), into WORK/teacher_all;
(b) teacher with the default held-out split, into WORK/study;
(c) KD + baseline students over --seeds with the teacher of (b), into WORK/study;
(d) a T x alpha grid of KD students and the baseline (one seed) with the teacher of (b), into
    WORK/grid.

For each: the command, the wall seconds, the training seconds main.py recorded per seed, and
from its results.json each model's test accuracy with test-time augmentation (TTA) and in a
single view; for (c) and (d) the paired student - baseline differences (mean, per seed, 95%
interval), single view and TTA. Everything, with the machine (CPU model, cores, GPU, versions,
load average before and after each step), goes to --json; a Markdown section ready for
bench/RESULTS.md is printed at the end. --subset and --epochs make a short smoke run of the same
steps (its numbers are not the full-data ones, and the section says so). The environment,
OMP_NUM_THREADS included, is passed to every subprocess unchanged.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import torch  # noqa: E402

from bench import machine_info as bench_machine_info  # noqa: E402
from kd.engine.timing import Stopwatch  # noqa: E402

CPU = torch.device('cpu')  # the runs are subprocesses: nothing of this process to synchronise


class RunFailed(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', required=True, help='folder holding cifar-10-batches-py')
    p.add_argument('--device', default='cpu', help='--device for main.py (default: cpu)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                   help='seeds of the KD + baseline study (c) (default: 0 1 2)')
    p.add_argument('--temperature', type=float, nargs='+', default=[2.0, 4.0, 8.0],
                   help='temperatures of the grid (d) (default: 2 4 8)')
    p.add_argument('--alpha', type=float, nargs='+', default=[0.1, 0.5],
                   help='alphas of the grid (d) (default: 0.1 0.5)')
    p.add_argument('--subset', type=int, default=None,
                   help='first N training and test images: a smoke run (default: all)')
    p.add_argument('--epochs', type=int, default=None,
                   help='epochs instead of the recipe\'s (default: the recipe\'s)')
    p.add_argument('--skip', nargs='+', choices=('a', 'b', 'c', 'd'), default=[],
                   help='steps to leave out ((c) and (d) need (b)) (default: none)')
    p.add_argument('--work-dir', default=None,
                   help='where the runs write (kept); default: a temporary folder, removed '
                        'at the end')
    p.add_argument('--main-flags', default='',
                   help='extra flags for every main.py run, e.g. --main-flags=--no-amp to pin '
                        'float32 (default: none)')
    p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'fast_results.json'),
                   help='where to write the results (default: bench/fast_results.json)')
    return p.parse_args(argv)


def machine_info(device):
    """bench.py's machine facts (CPU model, cores, GPU, versions, load) and the thread setting."""
    info = bench_machine_info(torch.device(device))
    info.update(omp_num_threads=os.environ.get('OMP_NUM_THREADS'), executable=sys.executable)
    return info


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_timed(argv, work, log):
    """python main.py ARGV from the repository root; (wall seconds, output)."""
    cmd = [sys.executable, 'main.py', *argv]
    shown = ' '.join(shlex.quote(a) for a in ['python', 'main.py', *argv]).replace(work, '$WORK')
    log(f'$ {shown}')
    watch = Stopwatch(CPU).start()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ))
    seconds = watch.elapsed()
    if proc.returncode != 0:
        tail = '\n'.join(proc.stdout.splitlines()[-20:])
        raise RunFailed(f'exit {proc.returncode} after {seconds:.1f}s: {shown}\n{tail}')
    return shown, seconds, proc.stdout


def summary_of(out_dir, phase):
    """The numbers of one phase from OUT_DIR/results.json."""
    with open(os.path.join(out_dir, 'results.json')) as f:
        results = json.load(f)
    keys = ('test_acc', 'test_acc_std', 'test_acc_tta', 'test_acc_tta_std', 'val_acc_tta',
            'best_val_acc', 'params', 'arch', 'loss', 'loss_params', 'precision')
    models = {n: {k: e[k] for k in keys if k in e} for n, e in results['models'].items()
              if (n == 'teacher') == (phase == 'teacher')}
    info = results['phases'][phase]
    out = {'models': models, 'train_seconds': info['train_seconds'],
           'wall_seconds_per_seed': info['wall_seconds'],
           'precision': info['config'].get('precision'),
           'recipe': info['config'].get('recipe_values')}
    if phase == 'students':
        out['gains'] = results.get('gains')
        out['gains_tta'] = results.get('gains_tta')
    return out


def step(key, title, argv, out_dir, phase, work, log):
    load_before = load_average()
    command, seconds, _ = run_timed(argv + ['--out-dir', out_dir], work, log)
    entry = {'title': title, 'command': command, 'wall_seconds': round(seconds, 1),
             'load_average_before': load_before, 'load_average_after': load_average(),
             **summary_of(out_dir, phase)}
    log(f'  ({key}) {seconds:.1f} s')
    for name, m in entry['models'].items():
        log(f"    {name:<16} test {m.get('test_acc', float('nan')):6.2f}  "
            f"TTA {m.get('test_acc_tta', float('nan')):6.2f}")
    return entry


def gain_text(g):
    if not g:
        return '-'
    ci = '' if g.get('ci95') is None else f", 95% CI [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
    return f"{g['mean']:+.2f} ({', '.join(f'{d:+.2f}' for d in g['per_seed'])}{ci})"


def pm(m, key):
    if m.get(key) is None:
        return '-'
    std = m.get(key + '_std')
    return f'{m[key]:.2f}' + (f' ± {std:.2f}' if std is not None else '')


def markdown(results):
    """A section for bench/RESULTS.md."""
    machine = results['machine']
    lines = [f"## The fast recipe's workflow — {machine.get('gpu') or 'CPU'}, {results['date']}",
             '',
             f"- Machine: {machine['cpu']} ({machine['cpu_count']} logical cores), GPU "
             f"{machine.get('gpu') or 'none'}, torch {machine['torch']}, torch threads "
             f"{machine['torch_threads']}, OMP_NUM_THREADS "
             f"{machine['omp_num_threads'] or 'unset'}; load average "
             f"{' '.join(f'{x:.2f}' for x in machine.get('load_average') or [])} at the start",
             f"- Command (repository root), {results['total_seconds']:.0f} s in all: "
             f"`{results['command']}`",
             f"- Data: {results['data']}", '']
    if results['smoke']:
        lines += ['A smoke run (--subset / --epochs): not the full-data figures.', '']
    lines += ['| step | wall time (s) | model | test acc., TTA (%) | single view (%) |',
              '|---|---:|---|---:|---:|']
    for key, entry in results['steps'].items():
        for i, (name, m) in enumerate(entry['models'].items()):
            first = f"({key}) {entry['title']} | {entry['wall_seconds']:.0f}" if i == 0 else ' | '
            lines.append(f"| {first} | {name} | {pm(m, 'test_acc_tta')} | {pm(m, 'test_acc')} |")
    lines.append('')
    for key, entry in results['steps'].items():
        lines.append(f"- ({key}) `{entry['command']}`; training seconds per seed "
                     f"{entry['train_seconds']}; precision {entry['precision']}")
        for name, g in (entry.get('gains') or {}).items():
            lines.append(f"  - {name} − baseline (paired): single view {gain_text(g)}; TTA "
                         f"{gain_text((entry.get('gains_tta') or {}).get(name))}")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    total = Stopwatch(CPU).start()
    work = args.work_dir or tempfile.mkdtemp(prefix='fast_bench.')
    os.makedirs(work, exist_ok=True)
    log = print
    machine = machine_info(args.device)
    common = ['--recipe', 'fast', '--data-dir', args.data_dir, '--device', args.device]
    common += ['--subset', str(args.subset)] if args.subset else []
    common += ['--epochs', str(args.epochs)] if args.epochs else []
    common += shlex.split(args.main_flags)
    study, teacher = os.path.join(work, 'study'), os.path.join(work, 'study', 'best_teacher.pth')
    plan = {
        'a': ('teacher, --val-fraction 0', ['--train-teacher', '--val-fraction', '0'],
              os.path.join(work, 'teacher_all'), 'teacher'),
        'b': ('teacher, default split', ['--train-teacher'], study, 'teacher'),
        'c': (f"KD + baseline, --seeds {' '.join(map(str, args.seeds))}",
              ['--seeds', *map(str, args.seeds)], study, 'students'),
        'd': ('T x alpha grid, seed 0',
              ['--temperature', *(f'{t:g}' for t in args.temperature),
               '--alpha', *(f'{a:g}' for a in args.alpha), '--teacher-checkpoint', teacher],
              os.path.join(work, 'grid'), 'students'),
    }
    results = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               'command': ' '.join(['python', 'bench/fast_bench.py'] + (argv or sys.argv[1:])),
               'data': args.data_dir + (f' (--subset {args.subset})' if args.subset else ''),
               'smoke': bool(args.subset or args.epochs), 'machine': machine, 'steps': {}}
    rc = 0
    try:
        for key, (title, argv_step, out_dir, phase) in plan.items():
            if key in args.skip:
                continue
            results['steps'][key] = step(key, title, common + argv_step, out_dir, phase, work,
                                         log)
    except RunFailed as e:
        log(f'FAILED: {e}')
        results['failed'] = str(e)
        rc = 1
    results['total_seconds'] = round(total.elapsed(), 1)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    log('')
    log(markdown(results))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == '__main__':
    sys.exit(main())
