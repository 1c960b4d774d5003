"""Whole processes side by side: `python main.py` against the reference way (bench/reference_kd.py).

    python bench/cli_bench.py --data-dir DIR [--subset 5000] [--epochs 1] [--quick-subset 2000]
        [--quick-epochs 3] [--repeats 1] [--json bench/cli_results.json] [--skip a b c]
        [--device cpu]

Every measurement is a fresh subprocess (run from the repository root with this interpreter),
timed from its start to its exit in wall seconds: imports, data reading, training, evaluation
and writing included. In one run, on the machine at hand:

(a) main.py --epochs E --subset S --val-fraction 0 (KD + baseline students in lockstep) against
    reference_kd.py --epochs E --subset S, both with the same teacher, trained first (not timed)
    by `main.py --train-teacher --epochs 1 --subset S --val-fraction 0`, as a user's would be.
(b) the quick run: main.py --epochs QE --subset Q (default --val-fraction) against
    reference_kd.py --epochs QE --subset Q, both with a teacher trained first (not timed) by
    `main.py --train-teacher --epochs 1 --subset Q` in its own folder, so its run record matches.
(c) main.py --seeds 0 1 2 --epochs E --subset Q --no-baseline with that teacher, against the
    same command with a copy of the teacher that has no stored test-set logits (so one teacher
    pass over the test images is paid; the code before them paid one per seed and more).
(d) a grid in one run, main.py --temperature 2 4 8 --alpha 0.1 0.5 --epochs E --subset S
    --val-fraction 0 (6 KD students and the baseline, one teacher forward per batch), against
    the 6 separate runs a user makes without it (--temperature T --alpha A, each with its
    baseline), with the teacher of (a); the separate runs' seconds are summed.

--repeats N runs each measurement N times, alternating ours / reference, and reports the median;
speed-up = reference seconds / our seconds. For our runs the lines starting with 'precision'
(also after '; ') or containing 'frozen' or 'images/s' are shown. The environment, including
OMP_NUM_THREADS, is passed to every subprocess unchanged: unset, each process uses torch's own
default thread count (the number of cores); set OMP_NUM_THREADS=1 for one thread. Everything
(commands, seconds, speed-ups, CPU model, torch version, thread count, date) goes to --json, and
a Markdown table ready for bench/RESULTS.md is printed at the end. All temporary folders live
under one tempfile.mkdtemp() that is removed at the end.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
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
OURS_FLAGS = []  # --ours-flags, split
MAIN = 'main.py'
REFERENCE = os.path.join('bench', 'reference_kd.py')


class RunFailed(Exception):
    pass


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='Threads: OMP_NUM_THREADS is passed through unchanged; unset, torch uses its own '
               'default (the number of cores) in every process.')
    p.add_argument('--data-dir', required=True, help='folder holding cifar-10-batches-py')
    p.add_argument('--subset', type=positive_int, default=5000,
                   help='training and test images of (a) (default: 5000)')
    p.add_argument('--epochs', type=positive_int, default=1,
                   help='epochs of (a) and of each seed of (c) (default: 1)')
    p.add_argument('--quick-subset', type=positive_int, default=2000,
                   help='images of the quick run (b), its teacher and (c) (default: 2000)')
    p.add_argument('--quick-epochs', type=positive_int, default=3,
                   help='epochs of the quick run (b) (default: 3)')
    p.add_argument('--repeats', type=positive_int, default=1,
                   help='runs of each measurement, alternating ours / reference; the median is '
                        'reported (default: 1)')
    p.add_argument('--device', default='cpu',
                   help='--device for main.py and reference_kd.py (default: cpu)')
    p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'cli_results.json'),
                   help='where to write the results (default: bench/cli_results.json)')
    p.add_argument('--ours-flags', default='',
                   help='extra flags for our timed runs, e.g. --ours-flags=--no-amp to pin '
                        'float32 (default: none)')
    p.add_argument('--skip', nargs='+', choices=('a', 'b', 'c', 'd'), default=[],
                   help='measurements to leave out (default: none)')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Machine

def machine_info():
    """bench.py's machine facts (CPU model, cores, versions, load), plus the thread settings."""
    info = bench_machine_info(CPU)
    info.update(omp_num_threads=os.environ.get('OMP_NUM_THREADS'), executable=sys.executable)
    if 'load_average' in info:
        info['load_average'] = [round(x, 2) for x in info['load_average']]
    return info


def threads_text(machine):
    omp = machine['omp_num_threads']
    text = f'OMP_NUM_THREADS={omp}' if omp is not None else 'OMP_NUM_THREADS unset (torch default)'
    return text + f", torch threads {machine['torch_threads']}"


# ---------------------------------------------------------------------------------------------
# Running and timing

def display(cmd, tmp):
    """The command as typed from the repository root, temporary folders shown as $TMP."""
    text = ' '.join(shlex.quote(a) for a in ['python', *cmd[1:]])
    return text.replace(tmp, '$TMP')


def run_timed(cmd, tmp):
    """Run cmd from the repository root; (wall seconds from start to exit, merged output)."""
    watch = Stopwatch(CPU).start()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ))
    seconds = watch.elapsed()
    if proc.returncode != 0:
        tail = '\n'.join(proc.stdout.splitlines()[-20:]).replace(tmp, '$TMP')
        raise RunFailed(f'exit {proc.returncode} after {seconds:.1f}s: {display(cmd, tmp)}\n'
                        f'{tail}')
    return seconds, proc.stdout


PRECISION = re.compile(r'(^|;\s*)precision\b', re.IGNORECASE)


def our_lines(output):
    """main.py's lines about precision, a frozen teacher or throughput."""
    return [line.strip() for line in output.splitlines()
            if PRECISION.search(line.strip()) or 'frozen' in line.lower()
            or 'images/s' in line.lower()]


def teacher_logits_lines(output):
    return [line.strip() for line in output.splitlines()
            if 'teacher' in line.lower() and 'logits' in line.lower()]


def unique(lines):
    return list(dict.fromkeys(lines))


def measure(key, ways, repeats, tmp, log):
    """ways: {name: function(out_dir) -> argv, or a list of argvs run one after the other and
    timed together}; each run N times, alternating; the first way is ours."""
    entry = {name: {'commands': [], 'seconds': [], 'lines': [], 'teacher_logits_lines': []}
             for name in ways}
    for i in range(repeats):
        for name, make in ways.items():
            out_dir = os.path.join(tmp, f'{key}-{name}-{i + 1}')
            cmds = make(out_dir)
            cmds = cmds if isinstance(cmds[0], list) else [cmds]
            if name == 'ours' or MAIN in cmds[0]:
                cmds = [c + OURS_FLAGS if MAIN in c else c for c in cmds]
            seconds, output = 0.0, ''
            for i_cmd, cmd in enumerate(cmds):
                s, o = run_timed(cmd + (['--out-dir', f'{out_dir}-{i_cmd}'] if len(cmds) > 1
                                        else []), tmp)
                seconds, output = seconds + s, output + o
            rec = entry[name]
            rec['commands'].append(' && '.join(display(c, tmp) for c in cmds))
            rec['seconds'].append(seconds)
            if name == 'ours':
                rec['lines'] = unique(rec['lines'] + our_lines(output))
                rec['teacher_logits_lines'] = unique(rec['teacher_logits_lines']
                                                     + teacher_logits_lines(output))
            log(f'  ({key}) {name:<9} run {i + 1}/{repeats}: {seconds:8.1f} s')
    for name, rec in entry.items():
        rec['median'] = statistics.median(rec['seconds'])
        rec['command'] = rec['commands'][0]
        if name != 'ours':
            del rec['lines'], rec['teacher_logits_lines']
    other = [n for n in ways if n != 'ours']
    if other:
        entry['speedup'] = entry[other[0]]['median'] / entry['ours']['median']
    return entry


def print_entry(entry, log):
    ours = entry['ours']
    other = [n for n in entry if n not in ('ours', 'speedup')]
    if other:
        log(f"  ours {ours['median']:.1f} s, {other[0]} {entry[other[0]]['median']:.1f} s, "
            f"speed-up {entry['speedup']:.2f}x ({other[0]} / ours)")
    else:
        log(f"  ours {ours['median']:.1f} s")
    for line in ours['lines']:
        log(f'    | {line}')
    for line in ours.get('teacher_logits_lines', []):
        log(f'    teacher logits | {line}')


# ---------------------------------------------------------------------------------------------
# Report

def markdown(results):
    m, args = results['machine'], results['args']
    seconds = results['total_seconds']
    median = f"median of {args['repeats']} runs each, alternating ours / reference" \
        if args['repeats'] > 1 else 'one run each'
    out = [f"## Whole processes, main.py against the reference way ({results['date']})", '',
           f"- Machine: CPU {m['cpu']} ({m['cpu_count']} logical cores), {threads_text(m)}, "
           f"device {args['device']}; torch {m['torch']}, torchvision {m['torchvision']}, "
           f"Python {m['python']}"
           + (f"; load average {' '.join(str(x) for x in m['load_average'])} at the start"
              if 'load_average' in m else ''),
           f"- Command (repository root), {seconds:.0f} s in all:", '',
           f"      {results['command']}", '',
           f'- Each time is one fresh process from start to exit (wall seconds), {median}; '
           f'speed-up = reference / ours.', '',
           '| run | this project (s) | the other way (s) | speed-up |', '|---|---:|---:|---:|']
    labels = {
        'a': f"(a) KD + baseline students, {args['epochs']} epoch(s), `--subset {args['subset']} "
             f"--val-fraction 0`, teacher trained with `--train-teacher --epochs 1`",
        'b': f"(b) quick run, {args['quick_epochs']} epoch(s), `--subset {args['quick_subset']}`, "
             f"teacher trained with `--train-teacher --epochs 1`",
        'c': f"(c) `--seeds 0 1 2 --epochs {args['epochs']} --subset {args['quick_subset']} "
             f"--no-baseline`, same teacher; the other way: a copy without stored test logits",
        'd': f"(d) grid of 6 KD students (T 2 4 8 × α 0.1 0.5) + baseline in one run, "
             f"{args['epochs']} epoch(s), `--subset {args['subset']} --val-fraction 0`; the other "
             f"way: 6 separate runs, each with its baseline",
    }
    runs = results['runs']
    for key in ('a', 'b', 'c', 'd'):
        if key not in runs:
            continue
        e = runs[key]
        other = [n for n in e if n not in ('ours', 'speedup')]
        ref = e[other[0]] if other else None
        out.append(f"| {labels[key]} | {e['ours']['median']:.1f} | "
                   + (f"{ref['median']:.1f} | {e['speedup']:.2f}× |" if ref else '— | — |'))
    notes = []
    for key in ('a', 'b', 'c', 'd'):
        if key in runs:
            for line in runs[key]['ours']['lines']:
                notes.append(f'- ({key}) `{line}`')
    if 'c' in runs:
        lines = runs['c']['ours']['teacher_logits_lines']
        notes += [f'- (c) teacher logits: `{line}`' for line in lines] or \
            ['- (c) no output line mentions the teacher\'s test logits']
    if notes:
        out += ['', 'Lines of our output (precision, frozen teacher, images/s):', ''] + notes
    return '\n'.join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    OURS_FLAGS[:] = shlex.split(args.ours_flags)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    machine = machine_info()
    omp = os.environ.get('OMP_NUM_THREADS')
    command = (f'OMP_NUM_THREADS={shlex.quote(omp)} ' if omp is not None else '') + \
        ' '.join(shlex.quote(a) for a in ['python', os.path.relpath(os.path.abspath(sys.argv[0]),
                                                                     ROOT), *argv])
    date = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    results = {'date': date, 'machine': machine, 'command': command, 'args': vars(args),
               'runs': {}}
    log(f'date     {date}')
    log(f"machine  CPU {machine['cpu']} ({machine['cpu_count']} logical cores), "
        f"{threads_text(machine)}")
    log(f"torch    {machine['torch']}, torchvision {machine['torchvision']}, "
        f"python {machine['python']}")
    log(f'command  {command}\n')

    py, dev, data = sys.executable, args.device, args.data_dir
    total = Stopwatch(CPU).start()
    tmp = tempfile.mkdtemp(prefix='cli_bench-')
    code = 0
    try:
        size = ['--epochs', str(args.epochs), '--subset', str(args.subset)]
        if 'a' not in args.skip or 'd' not in args.skip:
            # the students' teacher, trained as a user would (untimed): its run record and its
            # stored test-set logits come with it
            teacher_a_dir = os.path.join(tmp, 'teacher-a')
            cmd = [py, MAIN, '--train-teacher', '--epochs', '1', '--subset', str(args.subset),
                   '--val-fraction', '0', '--data-dir', data, '--out-dir', teacher_a_dir,
                   '--device', dev]
            log(f'training the teacher for (a) and (d) (not timed): {display(cmd, tmp)}')
            seconds, _ = run_timed(cmd, tmp)
            results['teacher_training_a'] = {'command': display(cmd, tmp), 'seconds': seconds}
            teacher_a = os.path.join(teacher_a_dir, 'best_teacher.pth')
        if 'a' not in args.skip:
            rest = ['--teacher-checkpoint', teacher_a, '--data-dir', data]
            log(f'(a) KD + baseline, {args.epochs} epoch(s) of {args.subset} images')
            results['runs']['a'] = measure('a', {
                'ours': lambda d: [py, MAIN, *size, '--val-fraction', '0', *rest,
                                   '--out-dir', d, '--device', dev],
                'reference': lambda d: [py, REFERENCE, *size, *rest, '--out-dir', d,
                                        '--device', dev],
            }, args.repeats, tmp, log)
            print_entry(results['runs']['a'], log)

        if 'b' not in args.skip or 'c' not in args.skip:
            teacher_dir = os.path.join(tmp, 'teacher')
            cmd = [py, MAIN, '--train-teacher', '--epochs', '1', '--subset',
                   str(args.quick_subset), '--data-dir', data, '--out-dir', teacher_dir,
                   '--device', dev]
            log(f'\ntraining the teacher for (b) and (c) (not timed): {display(cmd, tmp)}')
            seconds, _ = run_timed(cmd, tmp)
            results['teacher_training'] = {'command': display(cmd, tmp), 'seconds': seconds}
            teacher = os.path.join(teacher_dir, 'best_teacher.pth')
            subset = ['--subset', str(args.quick_subset)]
            rest = ['--teacher-checkpoint', teacher, '--data-dir', data]

            if 'b' not in args.skip:
                log(f'(b) quick run, {args.quick_epochs} epoch(s) of {args.quick_subset} images')
                qe = ['--epochs', str(args.quick_epochs)]
                results['runs']['b'] = measure('b', {
                    'ours': lambda d: [py, MAIN, *qe, *subset, *rest, '--out-dir', d,
                                       '--device', dev],
                    'reference': lambda d: [py, REFERENCE, *qe, *subset, *rest, '--out-dir', d,
                                            '--device', dev],
                }, args.repeats, tmp, log)
                print_entry(results['runs']['b'], log)

            if 'c' not in args.skip:
                log(f'(c) three seeds, KD student only, {args.epochs} epoch(s) of '
                    f'{args.quick_subset} images')
                bare = os.path.join(tmp, 'teacher-without-logits')
                os.makedirs(bare)
                for name in ('best_teacher.pth', 'best_teacher.json'):
                    shutil.copy(os.path.join(teacher_dir, name), bare)
                seeds = ['--seeds', '0', '1', '2', '--epochs', str(args.epochs), *subset,
                         '--no-baseline', '--data-dir', data, '--device', dev]
                results['runs']['c'] = measure('c', {
                    'ours': lambda d: [py, MAIN, *seeds, '--teacher-checkpoint', teacher,
                                       '--out-dir', d],
                    'without stored logits': lambda d: [
                        py, MAIN, *seeds, '--teacher-checkpoint',
                        os.path.join(bare, 'best_teacher.pth'), '--out-dir', d],
                }, args.repeats, tmp, log)
                print_entry(results['runs']['c'], log)

        if 'd' not in args.skip:
            log(f'(d) a grid of 6 KD students + baseline in one run against 6 separate runs, '
                f'{args.epochs} epoch(s) of {args.subset} images')
            common = [*size, '--val-fraction', '0', '--teacher-checkpoint', teacher_a,
                      '--data-dir', data, '--device', dev]
            settings = [(t, a) for t in ('2', '4', '8') for a in ('0.1', '0.5')]
            results['runs']['d'] = measure('d', {
                'ours': lambda d: [py, MAIN, *common, '--temperature', '2', '4', '8',
                                   '--alpha', '0.1', '0.5', '--out-dir', d],
                'separate runs': lambda d: [[py, MAIN, *common, '--temperature', t, '--alpha', a]
                                            for t, a in settings],
            }, args.repeats, tmp, log)
            print_entry(results['runs']['d'], log)
    except RunFailed as e:
        log(f'error: {e}')
        results['error'] = str(e).replace(tmp, '$TMP')
        code = 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        results['total_seconds'] = total.elapsed()

    if code == 0:
        log('\n' + markdown(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    log(f'\nwrote {args.json}')
    return code


if __name__ == '__main__':
    sys.exit(main())
