"""torchrun / DDP on CPU with gloo: whole runs, equivalence with one process, failures, signals.

Everything runs on 2 CPU processes with one thread each, on the tiny data of conftest.py.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT

NPROC = 2
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={NPROC}']
MAIN = os.path.join(ROOT, 'main.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def torchrun(script, *args, timeout=300, env=None):
    """torchrun --nproc_per_node=2 SCRIPT ARGS; returns (CompletedProcess, seconds)."""
    t0 = time.time()
    proc = subprocess.run([*TORCHRUN, script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(ENV, **(env or {})), cwd=ROOT)
    return proc, time.time() - t0


def temp_files(folder):
    """Leftovers of atomic writes or write probes (hidden files, *.tmp) anywhere under folder."""
    found = []
    for dirpath, _, names in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in names
                  if n.startswith('.') or n.endswith('.tmp')]
    return found


# ---------------------------------------------------------------------------------------------
# A whole run through torchrun: the teacher, then the students

@pytest.fixture(scope='module')
def ddp_run(cifar_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ddp_run'))
    common = ['--data-dir', cifar_dir, '--out-dir', out, '--device', 'cpu', '--epochs', '1',
              '--batch-size', '32', '--subset', '100']
    teacher, _ = torchrun(MAIN, '--train-teacher', *common)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    students, _ = torchrun(MAIN, *common)
    assert students.returncode == 0, students.stderr[-3000:]
    return {'out': out, 'teacher': teacher, 'students': students, 'common': common}


# a whole CLI run under torchrun (18 s here): the slow selection; the equivalence tests below
# check the algorithm's distributed parts in every run of the suite
@pytest.mark.slow
def test_torchrun_teacher_then_students_write_once(ddp_run):
    from kd.files.checkpoint import load_file
    from kd.models import StudentNet, TeacherNet
    out = ddp_run['out']
    for phase, proc in (('teacher', ddp_run['teacher']), ('students', ddp_run['students'])):
        lines = proc.stdout.splitlines()
        # rank 0 alone logs: one configuration block, one epoch line, one closing line
        assert sum(line.startswith('Configuration:') for line in lines) == 1, proc.stdout
        assert sum(line.startswith(f'{phase} ') and ' 1/1 ' in line for line in lines) == 1, \
            proc.stdout
        assert sum('results.json' in line for line in lines) == 1, proc.stdout
        assert 'x 2 processes' in proc.stdout
        assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    required = {'best_teacher.pth', 'best_student_kd.pth', 'best_student_base.pth',
                'last_teacher.pt', 'last_students.pt', 'log_teacher.csv', 'log_student_kd.csv',
                'log_student_base.csv', 'results.json', 'results.md'}
    assert required <= set(os.listdir(out)), os.listdir(out)
    assert not temp_files(out), temp_files(out)
    for name, cls in (('teacher', TeacherNet), ('student_kd', StudentNet),
                      ('student_base', StudentNet)):
        state = torch.load(os.path.join(out, f'best_{name}.pth'), weights_only=True)
        assert not any(k.startswith(('module.', '_orig_mod.')) for k in state), name
        cls().load_state_dict(state, strict=True)
        with open(os.path.join(out, f'log_{name}.csv')) as f:
            assert len(f.read().strip().splitlines()) == 2  # header + one epoch
    for phase in ('teacher', 'students'):
        state = load_file(os.path.join(out, f'last_{phase}.pt'))
        assert state['finished'] and state['config']['world_size'] == NPROC
        for weights in state['models'].values():
            assert not any(k.startswith('module.') for k in weights)
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    assert {'teacher', 'student_kd', 'student_base'} <= set(results['models'])
    assert results['config']['world_size'] == NPROC


@pytest.mark.slow
def test_torchrun_evaluate_matches_results(ddp_run):
    """--evaluate under torchrun prints the table once, with the accuracies of results.json."""
    proc, _ = torchrun(MAIN, '--evaluate', *ddp_run['common'], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Test set:') == 1, proc.stdout
    with open(os.path.join(ddp_run['out'], 'results.json')) as f:
        results = json.load(f)
    for name, label in (('student_kd', 'Student (KD)'), ('student_base', 'Student (baseline)')):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(label))
        assert f"{results['models'][name]['test_acc']:.2f}" in row, (row, results['models'][name])


# ---------------------------------------------------------------------------------------------
# Equivalence: 2 processes x half the batch == 1 process x the whole batch

BATCH, STEPS = 16, 2


def _make_inputs(path):
    from kd.models import StudentNet, TeacherNet
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    inputs = {
        'teacher': TeacherNet().state_dict(),
        'student': StudentNet().state_dict(),
        'images': torch.randn(STEPS, BATCH, 3, 32, 32, generator=g),
        'labels': torch.randint(0, 10, (STEPS, BATCH), generator=g),
        # uint8 data for the evaluation loaders: 30 training images (6 held out), 37 test
        'arrays': (torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (30,), generator=g),
                   torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (37,), generator=g)),
    }
    torch.save(inputs, path)
    return inputs


def _train_and_evaluate(inputs, ddp, rank, world):
    """STEPS train_step calls on this rank's slice of each batch, then a sharded evaluation.

    The models run in float64: the 2-process result then equals the 1-process one to ~1e-16,
    so the tolerance can be tight enough to catch any difference in the algorithm. In float32,
    rounding flips a few max-pool and ReLU choices and single weights differ by a few per cent
    of their update, which would hide small errors.
    """
    from dataclasses import replace

    from kd.files.checkpoint import plain_state_dict
    from kd.models import StudentNet, TeacherNet, build_model
    from kd.recipes import get_recipe, lookahead_step
    from kd.engine.evaluate import evaluate, predict, predict_views
    from kd.engine.step import train_step
    from kd.engine.trainee import Trainee, TraineeOptions
    from kd.recipes import Recipe
    from kd.methods.plan import BuildContext, build_distiller, point_shapes
    from kd.models.features import WithPoints
    from kd.models import feature_points
    from kd.data.loader import Batch, make_loaders
    device = torch.device('cpu')
    recipe = Recipe(lr=0.1)
    # the fast recipe's student: parameter groups, label smoothing, frozen-scale BatchNorm,
    # whitening, and a lookahead update after each of the two steps
    fast = replace(get_recipe('fast'), batch_size=BATCH, epochs=1, lookahead_every=1)
    torch.manual_seed(0)
    fast_module = build_model('airbench94_small')
    fast_module.freeze_norm_scales()
    fast_module.init_whitening(inputs['images'][0])
    fast_trainee = Trainee('student_fast', fast_module.double(), 'kd', fast, device,
                           options=TraineeOptions(ddp=ddp))
    teacher = TeacherNet()
    teacher.load_state_dict(inputs['teacher'])
    teacher.double().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainees = []
    for name, kind in (('student_kd', 'kd'), ('student_base', 'ce')):
        module = StudentNet()
        module.load_state_dict(inputs['student'])
        trainees.append(Trainee(name, module.double(), kind, recipe, device,
                                options=TraineeOptions(ddp=ddp)))
    # feature methods: FitNets' regressor (with BatchNorm) and CRD's embeddings and memories,
    # which each rank updates with every rank's rows (the training set: the STEPS batches)
    teacher_points = feature_points('resnet18', teacher)
    student_points = feature_points('cnn', StudentNet())
    context = BuildContext(point_shapes(StudentNet(), student_points, device),
                           point_shapes(teacher, teacher_points, device),
                           inputs['labels'].flatten(), 10)
    featured = []
    for name, kind in (('student_fitnet', 'fitnet'), ('student_crd', 'crd')):
        module = StudentNet()
        module.load_state_dict(inputs['student'])
        torch.manual_seed(1)
        distiller = build_distiller(kind, {}, context).double()
        featured.append(Trainee(name, module.double(), kind, recipe, device,
                                options=TraineeOptions(ddp=ddp, distiller=distiller,
                                                       points=student_points)))
    featured_teacher = WithPoints(teacher, teacher_points)
    losses = []
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    for step in range(STEPS):
        out = train_step(trainees, teacher, inputs['images'][step, lo:hi].double(),
                         inputs['labels'][step, lo:hi], recipe)
        out += train_step([fast_trainee], teacher, inputs['images'][step, lo:hi].double(),
                          inputs['labels'][step, lo:hi], fast)
        lookahead_step(fast_trainee.lookahead, fast_trainee.module, fast, step + 1, STEPS)
        every = torch.arange(step * BATCH, (step + 1) * BATCH)
        out += train_step(featured, featured_teacher, inputs['images'][step, lo:hi].double(),
                          inputs['labels'][step, lo:hi], recipe,
                          batch=Batch(None, None, every[lo:hi], step, 0, 0, every, lo))
        losses.append([o[0].item() for o in out])
    # evaluation as main.py sets it up: loaders sharded per rank, every rank calling evaluate
    data = make_loaders(batch_size=BATCH, val_fraction=0.2, seed=0, eval_batch_size=10,
                        channels_last=True, rank=rank, world_size=world, arrays=inputs['arrays'])
    model = StudentNet()
    model.load_state_dict(inputs['student'])
    model = model.to(memory_format=torch.channels_last).eval()
    _, val_labels = predict(model, data.val)
    test_logits, test_labels = predict(model, data.test)
    tta_logits = predict_views(model, data.test)[1]
    return {'models': {t.name: plain_state_dict(t.module)
                       for t in trainees + [fast_trainee] + featured},
            'distillers': {t.name: t.distiller.state_dict() for t in featured},
            'losses': losses, 'tta_logits': tta_logits,
            'eval': {'val_n': len(val_labels), 'test_n': len(test_labels),
                     'val_acc': evaluate(model, data.val), 'test_acc': evaluate(model, data.test),
                     'test_labels': test_labels, 'test_logits': test_logits}}


def _worker(rank, world, init_file, inputs_path, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    dist.init_process_group('gloo', init_method='file://' + init_file, rank=rank,
                            world_size=world)
    try:
        inputs = torch.load(inputs_path, weights_only=True)
        result = _train_and_evaluate(inputs, True, rank, world)
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def equivalence(tmp_path_factory):
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp('equivalence')
    inputs = _make_inputs(str(tmp / 'inputs.pt'))
    ctx = mp.start_processes(_worker, args=(NPROC, str(tmp / 'init'), str(tmp / 'inputs.pt'),
                                            str(tmp)),
                             nprocs=NPROC, join=False, start_method='spawn')
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, 'the 2-process workers hung'
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(str(tmp / f'rank{r}.pt'), weights_only=True) for r in range(NPROC)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _train_and_evaluate(inputs, False, 0, 1)
    finally:
        torch.set_num_threads(threads)
    return ranks, reference


NAMES = ['student_kd', 'student_base', 'student_fast', 'student_fitnet', 'student_crd']


@pytest.mark.parametrize('name', NAMES)
def test_two_processes_equal_one_process(equivalence, name):
    ranks, reference = equivalence
    expected = dict(reference['models'][name], **{
        f'distiller.{k}': v for k, v in reference['distillers'].get(name, {}).items()})
    for r, result in enumerate(ranks):
        got = dict(result['models'][name], **{
            f'distiller.{k}': v for k, v in result['distillers'].get(name, {}).items()})
        assert list(got) == list(expected), 'parameter names differ (a module. prefix?)'
        for key, value in expected.items():
            if key.endswith('num_batches_tracked'):
                assert int(got[key]) == int(value) == STEPS, key
            else:
                torch.testing.assert_close(got[key], value, atol=1e-12, rtol=1e-10,
                                           msg=lambda m: f'rank {r} {name} {key}: {m}')
    # each rank's loss is the mean over its half; the mean over ranks is the global-batch loss
    index = NAMES.index(name)
    for step in range(STEPS):
        mean = sum(result['losses'][step][index] for result in ranks) / NPROC
        assert mean == pytest.approx(reference['losses'][step][index], rel=1e-6)


def test_sharded_evaluation_covers_every_image_on_every_rank(equivalence):
    ranks, reference = equivalence
    ref = reference['eval']
    assert (ref['val_n'], ref['test_n']) == (6, 37)
    for r, result in enumerate(ranks):
        got = result['eval']
        assert (got['val_n'], got['test_n']) == (6, 37), f'rank {r} evaluated only its shard'
        assert got['val_acc'] == pytest.approx(ref['val_acc'])
        assert got['test_acc'] == pytest.approx(ref['test_acc'])
        # gathered back into dataset order: image i's logits are at row i on every rank
        assert torch.equal(got['test_labels'], ref['test_labels'])
        assert torch.allclose(got['test_logits'], ref['test_logits'], atol=1e-5)
        assert torch.allclose(result['tta_logits'], reference['tta_logits'], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Failures end the job; a signal to torchrun stops every rank at the same batch

WRAPPER = textwrap.dedent('''\
    """main.py with a fault injected on one rank at the N-th train_step (test only)."""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import main; from kd.engine import step as train
    rank, mode = int(os.environ['RANK']), os.environ['FAULT_MODE']
    at, on = int(os.environ['FAULT_STEP']), int(os.environ['FAULT_RANK'])
    original, calls = train.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at and rank == on:
            if mode == 'raise':
                raise RuntimeError(f'simulated failure on rank {{rank}}')
            if mode == 'exit':
                os._exit(3)
            if mode == 'term':
                os.kill(os.getppid(), signal.SIGTERM)  # the parent is torchrun's agent
        return original(*args, **kwargs)

    train.train_step = train_step
    try:
        code = main.main(sys.argv[1:])
    finally:
        print(f'rank {{rank}} ran {{calls[0]}} steps', flush=True)
    sys.exit(code)
    ''')


@pytest.fixture(scope='module')
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp('wrapper') / 'faulty_main.py'
    path.write_text(WRAPPER.format(root=ROOT))
    return str(path)


def test_bad_batch_size_fails_fast_on_every_rank(cifar_dir, tmp_path):
    proc, seconds = torchrun(MAIN, '--train-teacher', '--epochs', '1', '--batch-size', '33',
                             '--device', 'cpu', '--data-dir', cifar_dir, '--out-dir',
                             str(tmp_path / 'out'), timeout=120)
    assert proc.returncode != 0
    assert 'not divisible by the 2 processes' in proc.stderr
    assert 'exitcode  : 2' in proc.stderr  # torchrun's summary: the ranks exited with code 2
    assert not os.path.exists(tmp_path / 'out' / 'results.json')
    assert seconds < 110


@pytest.mark.slow  # two ResNet-18 ranks under torchrun: 18 s on 2 cores
@pytest.mark.parametrize('mode', ['exit'])  # a hard crash: the harder case to notice
def test_failure_on_one_rank_ends_the_job(trained_run, cifar_dir, wrapper, tmp_path, mode):
    """Rank 1 fails at its 2nd step (an exception, or a hard exit): no hang, non-zero exit."""
    out = str(tmp_path / 'out')
    proc, seconds = torchrun(
        wrapper, '--epochs', '3', '--batch-size', '16', '--subset', '100', '--device', 'cpu',
        '--data-dir', cifar_dir, '--out-dir', out,
        '--teacher-checkpoint', os.path.join(trained_run['out'], 'best_teacher.pth'),
        env={'FAULT_MODE': mode, 'FAULT_STEP': '2', 'FAULT_RANK': '1'}, timeout=240)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert 'rank: 1' in proc.stderr or 'rank      : 1' in proc.stderr, proc.stderr[-3000:]
    if mode == 'raise':
        assert 'simulated failure on rank 1' in proc.stderr
    else:
        assert 'exitcode  : 3' in proc.stderr, proc.stderr[-3000:]
    assert seconds < 200  # bounded: far below the 10-minute collective timeout
    assert not os.path.exists(os.path.join(out, 'results.json'))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_ranks_together_and_resume_finishes(ddp_run, cifar_dir,
                                                                       wrapper, tmp_path):
    from kd.files.checkpoint import load_file
    out = str(tmp_path / 'out')
    args = ['--epochs', '2', '--batch-size', '16', '--subset', '100', '--device', 'cpu',
            '--data-dir', cifar_dir, '--out-dir', out,
            '--teacher-checkpoint', os.path.join(ddp_run['out'], 'best_teacher.pth')]
    proc, _ = torchrun(wrapper, *args, env={'FAULT_MODE': 'term', 'FAULT_STEP': '2',
                                            'FAULT_RANK': '0'}, timeout=240)
    assert proc.returncode != 0
    # rank 0 alone says so, with a command that resumes under torchrun
    assert proc.stderr.count('Interrupted (signal 15)') == 1, proc.stderr[-3000:]
    assert f'Resume with: torchrun --nproc_per_node={NPROC} ' in proc.stderr, proc.stderr[-3000:]
    steps = sorted(line for line in proc.stdout.splitlines() if ' ran ' in line)
    assert len(steps) == NPROC, proc.stdout
    counts = {int(line.split()[3]) for line in steps}
    assert len(counts) == 1, f'the ranks stopped at different batches: {steps}'
    state = load_file(os.path.join(out, 'last_students.pt'))
    assert not state['finished']
    steps_per_epoch = 90 // 16
    done = state['epoch'] * steps_per_epoch + state['batch']
    assert done == counts.pop() < 2 * steps_per_epoch
    if state['batch']:  # the partial epoch's sums cover the global batch, not rank 0's share
        assert state['partial']['student_kd'][4] == state['batch'] * 16, state['partial']
    assert not temp_files(out), temp_files(out)

    proc, _ = torchrun(MAIN, *args, '--resume', timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_file(os.path.join(out, 'last_students.pt'))['finished']
    with open(os.path.join(out, 'log_student_kd.csv')) as f:
        assert len(f.read().strip().splitlines()) == 3  # header + both epochs
    assert os.path.exists(os.path.join(out, 'results.json'))


# ---------------------------------------------------------------------------------------------
# No device synchronisation per batch

@pytest.mark.parametrize('world_size, expected_checks', [(1, 25), (2, 3)])
def test_stop_requests_are_agreed_every_few_batches_only_over_processes(
        monkeypatch, tmp_path, world_size, expected_checks):
    from kd.engine import loop
    from kd.engine.distributed import DistInfo
    from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles, train_phase
    from kd.engine.signals import StopSignal
    from kd.engine.trainee import Trainee
    from kd.models import StudentNet
    from kd.recipes.base import Recipe
    from kd.data.loader import make_loaders
    arrays = (torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100) % 10,
              torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10) % 10)
    data = make_loaders(batch_size=4, val_fraction=0.0, arrays=arrays)
    assert len(data.train) == 25
    checks = []
    monkeypatch.setattr(loop, 'any_rank', lambda flag: checks.append(flag) or False)
    recipe = Recipe(epochs=1)
    trainee = Trainee('student_base', StudentNet(), 'ce', recipe, torch.device('cpu'))
    train_phase('students', [trainee], data, recipe, PhaseFiles(str(tmp_path)),
                options=LoopOptions(torch.device('cpu'), DistInfo(0, world_size, 0),
                                    progress_bar=False),
                callbacks=LoopCallbacks(log=lambda *_: None, stop=StopSignal()))
    # batches 0, 10 and 20 over processes (a CPU all-reduce each); every batch in one process
    assert len(checks) == expected_checks


def test_ddp_students_skip_the_buffer_broadcast_and_sync_their_batchnorm(tmp_path):
    import torch.distributed as dist
    from kd.engine.distributed import SyncBatchNorm2d
    from kd.engine.trainee import Trainee, TraineeOptions
    from kd.models import StudentNet
    from kd.recipes.base import Recipe
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0,
                            world_size=1)
    try:
        t = Trainee('student_kd', StudentNet(), 'kd', Recipe(), torch.device('cpu'),
                    options=TraineeOptions(ddp=True))
        assert isinstance(t.train_model, torch.nn.parallel.DistributedDataParallel)
        ddp = t.train_model
        assert getattr(ddp, 'forward_sync_buffers', getattr(ddp, 'broadcast_buffers', None)) is False
        assert any(isinstance(m, SyncBatchNorm2d) for m in t.module.modules())
    finally:
        dist.destroy_process_group()
