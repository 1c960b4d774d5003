"""The CPU precision is decided once per machine and stored, so the same command trains in the
same precision every time; refusals come before any timing; Ctrl-C while measuring stops at once;
the estimate and the quick-run advice are written above the progress bar; every command the
program prints runs when pasted."""
import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

import main
from kd.run import teacher_form, tuning
from conftest import ROOT, run_cli, snapshot
from kd.engine.distributed import DistInfo
from kd.run.commands import fast_run_commands, quick_run_commands, resume_command
from kd.run.specs import ModelSpec
from kd.engine.state import STATE_FORMAT
from kd.run.tuning import PrecisionDecisions, Workload, decide_precisions, precision_from_rates

CPU = torch.device('cpu')
SHAPE = (8, 3, 32, 32)


@pytest.mark.parametrize('bf16, chosen', [(50.0, None), (100.0, None), (119.0, None),
                                          (120.0, torch.bfloat16), (300.0, torch.bfloat16)])
def test_bf16_only_when_at_least_1_2x_faster(bf16, chosen):
    assert precision_from_rates({'fp32': 100.0, 'bf16': bf16}) is chosen


def test_measuring_takes_the_median_of_timed_steps_after_warm_up(monkeypatch):
    calls = []
    # whole-batch step times: one burst of load during an fp32 step, which the median ignores
    times = {('fp32', 8): [1.0, 1.0, 9.0, 1.0, 1.0], ('bf16', 8): [0.5, 0.6, 0.5, 0.4, 0.5],
             ('fp32', 2): [0.25], ('bf16', 2): [0.125]}

    def step_fn(model, images, labels, dtype, training):
        name = 'fp32' if dtype is None else 'bf16'
        return lambda: calls.append((name, len(images)))

    def seconds(fn, device, repeats=1, warmup=0):
        for _ in range(warmup + repeats):
            fn()
        return times[calls[-1]].pop(0)
    monkeypatch.setattr(tuning, '_step_fn', step_fn)
    monkeypatch.setattr(tuning, 'seconds_per_call', seconds)
    rates = tuning.measure_precisions(torch.nn.Linear(1, 1), SHAPE, CPU, training=True)
    assert rates == {'fp32': 8.0, 'bf16': 16.0}
    # per precision: a quarter-batch warm-up and probe, a whole-batch warm-up, 5 timed steps
    # taken in turn with the other precision's
    assert calls.count(('fp32', 2)) == calls.count(('bf16', 2)) == 2
    assert calls.count(('fp32', 8)) == calls.count(('bf16', 8)) == 1 + tuning.TIMED_STEPS
    assert calls[-4:] == [('fp32', 8), ('bf16', 8)] * 2


class FakeMeasure:
    """measure_precisions with given figures, counting its calls."""

    def __init__(self, rates):
        self.rates, self.calls = rates, []

    def __call__(self, model, batch_shape, device, training, num_classes=10):
        self.calls.append((type(model).__name__, training))
        return dict(self.rates)


def decide(path, lines):
    store = PrecisionDecisions(str(path), 'test machine', lines.append)
    return decide_precisions([ModelSpec('student_kd', 'cnn', 'kd'),
                              ModelSpec('student_base', 'cnn', 'ce')],
                             Workload(CPU, SHAPE, 10, DistInfo()), None, store=store,
                             log=lines.append)


def test_the_decision_is_stored_reused_and_measured_again_once_deleted(tmp_path, monkeypatch):
    measure = FakeMeasure({'fp32': 100.0, 'bf16': 150.0})
    monkeypatch.setattr(tuning, 'measure_precisions', measure)
    path = tmp_path / 'cache' / 'precision.json'
    lines = []
    precisions, _, record = decide(path, lines)
    assert len(measure.calls) == 1          # the two students share one architecture
    assert precisions == {'student_kd': torch.bfloat16, 'student_base': torch.bfloat16}
    assert record['source'] == 'measured'
    key = 'cnn (training), batch 8x3x32x32'
    stored = json.loads(path.read_text())['machines']['test machine'][key]
    assert (stored['fp32'], stored['bf16'], stored['chosen']) == (100.0, 150.0, 'bf16')
    assert len(lines) == 1 and lines[0].startswith('precision: cnn (training): bf16, measured now')
    assert f'stored in {path}; delete it to measure again' in lines[0]

    # the same decision again, from the file, without timing, whatever the figures now are
    measure.rates = {'fp32': 150.0, 'bf16': 100.0}
    lines.clear()
    precisions, _, record = decide(path, lines)
    assert len(measure.calls) == 1
    assert set(precisions.values()) == {torch.bfloat16}
    assert record['source'] == 'stored' and record['decisions'][key]['source'] == 'stored'
    assert lines == [f"precision: cnn (training): bf16, decided on {stored['decided'][:10]} on "
                     f"this machine (fp32 100 images/s, bf16 150; bf16 only when 1.2x faster); "
                     f"stored in {path}; delete it to measure again"]

    path.unlink()   # the user's reset
    precisions, _, record = decide(path, [])
    assert len(measure.calls) == 2 and record['source'] == 'measured'
    assert set(precisions.values()) == {None}


def test_a_near_tie_settles_on_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, 'measure_precisions', FakeMeasure({'fp32': 100.0, 'bf16': 110.0}))
    precisions, _, record = decide(tmp_path / 'precision.json', [])
    assert set(precisions.values()) == {None}
    assert record['decisions']['cnn (training), batch 8x3x32x32']['chosen'] == 'fp32'


@pytest.mark.parametrize('content', [b'{"machines": {"test', b'\xff\xfe', b'[1, 2]',
                                     b'{"machines": {"test machine": {"cnn (training), batch '
                                     b'8x3x32x32": {"fp32": "fast", "bf16": -1}}}}'])
def test_a_damaged_file_is_noted_in_one_line_and_measured_again(tmp_path, monkeypatch, content):
    measure = FakeMeasure({'fp32': 100.0, 'bf16': 150.0})
    monkeypatch.setattr(tuning, 'measure_precisions', measure)
    path = tmp_path / 'precision.json'
    path.write_bytes(content)
    lines = []
    precisions, _, record = decide(path, lines)
    assert len(measure.calls) == 1 and record['source'] == 'measured'
    notes = [line for line in lines if 'measuring again' in line]
    assert len(notes) == 1 and str(path) in notes[0] and '\n' not in notes[0]
    # rewritten whole: the next run reads its decision
    assert decide(path, [])[2]['source'] == 'stored' and len(measure.calls) == 1


def test_an_unwritable_store_is_noted_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, 'measure_precisions', FakeMeasure({'fp32': 100.0, 'bf16': 150.0}))
    (tmp_path / 'file').write_text('')
    lines = []
    precisions, _, _ = decide(tmp_path / 'file' / 'precision.json', lines)
    assert set(precisions.values()) == {torch.bfloat16}
    assert any('cannot store the decision' in line for line in lines)
    assert lines[-1].endswith('not stored')


# ---------------------------------------------------------------------------------------------
# Refusals before any timing

def unfinished_teacher_state(folder, **config):
    config = dict(dataset='cifar10', teacher_arch='resnet18', epochs=3, batch_size=32, lr=0.025,
                  weight_decay=5e-4, seed=0, val_fraction=0.1, split_seed=0, subset=100,
                  precision={'teacher': 'fp32'}, **config)
    torch.save({'format': STATE_FORMAT, 'config': config, 'finished': False, 'epoch': 1},
               os.path.join(folder, 'last_teacher.pt'))


@pytest.mark.parametrize('flags, said', [
    ([], '--restart'),                                   # an unfinished run is not overwritten
    (['--resume', '--epochs', '5'], 'epochs: 3 -> 5'),   # a resume that changes the run
    (['--resume', '--amp'], 'that run trained in fp32'),         # a pin that contradicts it
])
def test_refusals_come_before_any_timing(flags, said, cifar_dir, tmp_path, monkeypatch, capsys):
    def no_timing(*_, **__):
        raise AssertionError('timed before refusing')
    monkeypatch.setattr(tuning, 'measure_precisions', no_timing)
    monkeypatch.setattr(teacher_form, 'fastest_teacher', no_timing)
    monkeypatch.setenv('KD_CIFAR_CACHE_DIR', str(tmp_path / 'empty cache'))
    out = tmp_path / 'run'
    out.mkdir()
    unfinished_teacher_state(out)
    before = snapshot(out)
    start = time.time()
    code = main.main(['--train-teacher', '--epochs', '3', '--subset', '100', '--batch-size', '32',
                      '--device', 'cpu', '--data-dir', cifar_dir, '--out-dir', str(out), *flags])
    printed = capsys.readouterr()
    assert code == 2, printed
    assert said in printed.err and len(printed.err.strip().splitlines()) == 1
    assert 'precision:' not in printed.out
    assert time.time() - start < 15
    assert snapshot(out) == before and not (tmp_path / 'empty cache').exists()


def test_ctrl_c_while_measuring_stops_at_once_and_writes_nothing(cifar_dir, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'run'
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'main.py'), '--train-teacher', '--epochs', '1',
         '--device', 'cpu', '--data-dir', cifar_dir, '--out-dir', str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1',
                 KD_CIFAR_CACHE_DIR=str(cache)))
    for line in proc.stdout:   # the line printed just before the timing starts
        if line.startswith('memory:'):
            break
    time.sleep(1.0)            # resnet18 at batch 128: seconds of timing ahead
    proc.send_signal(signal.SIGINT)
    start = time.time()
    rest, err = proc.communicate(timeout=60)
    assert time.time() - start < 10
    assert proc.returncode == 130
    assert err.strip() == 'Interrupted (signal 2) before training started; nothing to resume.'
    assert 'precision:' not in rest
    assert os.listdir(out) == [] and not cache.exists()


# ---------------------------------------------------------------------------------------------
# The console of a first CPU run, in a terminal: the estimate, the advice, the commands

def run_in_terminal(argv, cwd, env, interrupt_after, timeout=120):
    """Run argv with a pseudo-terminal as stdout and stderr (so tqdm draws its bar); send SIGINT
    once the output holds interrupt_after. Returns (exit code, raw output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 50, 200, 0, 0))  # rows, columns
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave)
    os.close(slave)
    raw, sent, deadline = b'', False, time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # the other side closed
                chunk = b''
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
        if not sent and interrupt_after.encode() in raw:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            sent = True
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    return proc.returncode, raw


def screen(raw):
    """The lines a terminal shows for raw output (carriage returns overwrite, escapes dropped)."""
    text = re.sub(r'\x1b\[[0-9;?]*[A-Za-z]', '', raw.decode(errors='replace'))
    lines, line, col = [], [], 0
    for ch in text:
        if ch == '\r':
            col = 0
        elif ch == '\n':
            lines.append(''.join(line).rstrip())
            line, col = [], 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + [''.join(line).rstrip()]


@pytest.mark.slow  # a terminal run, then every printed command run in turn (17 s)
def test_estimate_and_advice_on_their_own_lines_and_every_printed_command_runs(
        cifar_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1',
               KD_CIFAR_CACHE_DIR=str(tmp_path / 'cache'))
    folder = tmp_path / 'work'
    folder.mkdir()
    code, raw = run_in_terminal(
        [sys.executable, os.path.join(ROOT, 'main.py'), '--train-teacher', '--teacher-arch',
         'cnn', '--epochs', '100000', '--subset', '100', '--batch-size', '32', '--device', 'cpu',
         '--data-dir', cifar_dir], folder, env, interrupt_after='--out-dir quick')
    lines = screen(raw)
    assert code == 130, '\n'.join(lines[-20:])
    assert b'%|' in raw   # the progress bar was drawn
    estimate = [line for line in lines if 'should take about' in line]
    assert len(estimate) == 1 and re.fullmatch(
        r'teacher: \d+ images/s; 100000 epochs should take about .* \(training and evaluation\)',
        estimate[0]), estimate
    at = lines.index(estimate[0])
    assert lines[at + 1] == 'On a CPU, try the pipeline on part of the data first, in its own ' \
                            'folder:'
    advice = lines[at + 2]
    assert advice == (f'  python {os.path.join(ROOT, "main.py")} --train-teacher --epochs 3 '
                      f'--subset 2000 --teacher-arch cnn --data-dir {cifar_dir} --device cpu '
                      f'--batch-size 32 --out-dir quick')
    assert lines[at + 3:at + 5] == [
        'Or the fast recipe (airbench94\'s techniques, 10 epochs), in its own '
        'folder:',
        f'  python {os.path.join(ROOT, "main.py")} --train-teacher --recipe fast --data-dir '
        f'{cifar_dir} --device cpu --subset 100 --out-dir fast']
    assert any(line.startswith('precision: cnn (training): ') and 'measured now' in line
               for line in lines)
    resume = [line for line in lines if line.startswith('Resume with: ')]
    assert len(resume) == 1

    # the advice, pasted into the folder that holds the interrupted run's state, runs
    state = snapshot(folder)['last_teacher.pt']
    command = shlex.split(advice)
    r = subprocess.run([sys.executable] + command[1:], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(folder / 'quick' / 'best_teacher.pth')
    assert 'precision: cnn (training): ' in r.stdout and 'decided on' in r.stdout  # stored
    with open(folder / 'quick' / 'results.json') as f:
        assert json.load(f)['phases']['teacher']['config']['precision_source'] == 'stored'
    assert snapshot(folder)['last_teacher.pt'] == state   # the interrupted run is untouched

    # so does the resume command; it keeps its own precision, even with the decision deleted
    os.remove(tmp_path / 'cache' / 'precision.json')
    command = shlex.split(resume[0][len('Resume with: '):])
    code, raw = run_in_terminal([sys.executable] + command[1:], folder, env,
                                interrupt_after='/100000 lr ')   # an epoch line
    lines = screen(raw)
    assert code == 130, '\n'.join(lines[-20:])
    assert any(re.fullmatch(r'precision: (fp32|bf16), as the run being resumed', line)
               for line in lines)
    assert not any('measured now' in line for line in lines)


def test_quick_run_advice_keeps_the_runs_data_and_models(tmp_path):
    config = main.parse_config([
        '--dataset', 'cifar100', '--data-dir', 'my data', '--student-arch', 'resnet8x4',
        '--loss', 'kd', 'dkd', '--temperature', '2', '4', '--split-seed', '3', '--no-amp',
        '--out-dir', 'runs/a'])
    teacher, students = quick_run_commands(config, 'resnet32x4')
    assert shlex.split(teacher)[2:] == [
        '--train-teacher', '--epochs', '3', '--subset', '2000', '--teacher-arch', 'resnet32x4',
        '--dataset', 'cifar100', '--data-dir', 'my data', '--split-seed', '3', '--no-amp',
        '--out-dir', 'runs/a/quick']
    assert shlex.split(students)[2:] == [
        '--epochs', '3', '--subset', '2000', '--student-arch', 'resnet8x4', '--loss', 'kd',
        'dkd', '--temperature', '2.0', '4.0', '--dataset', 'cifar100', '--data-dir', 'my data',
        '--split-seed', '3', '--no-amp', '--out-dir', 'runs/a/quick']
    for command in (teacher, students):   # each parses as the program's own command line
        main.parse_config(shlex.split(command)[2:])


def test_the_fast_recipe_advice_keeps_the_runs_data_and_losses_and_parses(tmp_path):
    config = main.parse_config([
        '--data-dir', 'my data', '--student-arch', 'resnet8x4', '--loss', 'kd', 'dkd',
        '--temperature', '2', '4', '--split-seed', '3', '--no-amp', '--out-dir', 'runs/a'])
    teacher, students = fast_run_commands(config)
    assert shlex.split(teacher)[2:] == [
        '--train-teacher', '--recipe', 'fast', '--data-dir', 'my data', '--split-seed', '3',
        '--no-amp', '--out-dir', 'runs/a/fast']
    assert shlex.split(students)[2:] == [
        '--loss', 'kd', 'dkd', '--temperature', '2.0', '4.0', '--recipe', 'fast', '--data-dir',
        'my data', '--split-seed', '3', '--no-amp', '--out-dir', 'runs/a/fast']
    for command in (teacher, students):   # each parses as the program's own command line
        main.parse_config(shlex.split(command)[2:])
    fast = main.parse_config(['--recipe', 'fast', '--train-teacher'])
    assert fast_run_commands(fast) == []   # already the fast recipe


@pytest.mark.parametrize('flag', ['--restart', '--resume', '--rest', '--resu'])
def test_the_resume_command_drops_restart_and_its_abbreviations(flag, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['main.py', '--out-dir', 'a b', flag, '--epochs', '3'])
    monkeypatch.delenv('RANK', raising=False)
    assert resume_command() == "python main.py --out-dir 'a b' --epochs 3 --resume"
