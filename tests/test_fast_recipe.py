"""The recipe registry and the fast recipe's techniques (airbench94), each against its formula."""
import copy
import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main
from kd import recipes as r
from conftest import ROOT, run_cli
from kd.methods.registry import get_loss
from kd.models import AirbenchNet, build_model
from kd.engine.stacked import stacking_problem
from kd.engine.evaluate import predict, predict_views
from kd.engine.signals import TrainingInterrupted
from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles, train_phase
from kd.engine.step import PhaseTeacher, train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.data.loader import CifarLoader, make_loaders

FAST = r.get_recipe('fast')
CPU = torch.device('cpu')


# ---------------------------------------------------------------------------------------------
# The registry

def test_the_registry_holds_standard_and_fast_and_refuses_unknown_or_repeated_names():
    assert {'standard', 'fast'} <= set(r.recipe_names())
    assert r.get_recipe('standard') == r.Recipe()  # the standard recipe is the dataclass' defaults
    with pytest.raises(KeyError, match='known recipes: .*fast.*standard'):
        r.get_recipe('nope')
    with pytest.raises(ValueError, match='already registered'):
        r.register_recipe(r.Recipe(name='fast'))
    with pytest.raises(FrozenInstanceError):
        FAST.epochs = 3
    with pytest.raises(ValueError, match='flip'):
        r.Recipe(name='x', flip='sometimes')


def test_explicit_values_override_the_recipe_and_the_rest_come_from_it():
    standard = r.resolve_recipe('standard', batch_size=256)
    assert (standard.epochs, standard.batch_size, standard.lr) == (200, 256, 0.1 * 256 / 128)
    assert r.resolve_recipe('standard', batch_size=256, lr=0.3).lr == 0.3
    fast = r.resolve_recipe('fast', epochs=3, weight_decay=0.01)
    assert (fast.epochs, fast.batch_size, fast.lr, fast.weight_decay) == (3, 1024, 11.5, 0.01)
    # a per-1,024-images lr does not follow the batch size: the unit already does
    assert r.resolve_recipe('fast', batch_size=512).lr == 11.5


def test_an_unknown_recipe_on_the_command_line_exits_2(capsys):
    assert main.main(['--recipe', 'nope']) == 2
    assert 'nope' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The network

def training_images(n=600, seed=0):
    """Normalized images with neighbouring pixels and channels correlated, as in photographs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 33, 33, generator=g)
    smooth = (base[..., 1:, 1:] + base[..., :-1, 1:] + base[..., 1:, :-1]) / 3
    colour = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    return smooth * colour + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


def test_whitening_makes_the_patch_covariance_of_the_training_images_the_identity():
    images = training_images()
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12).double()
    assert torch.cov(patches.T).diag().min() > 0.1  # correlated, far from white, before
    model = AirbenchNet(widths=(8, 8, 8))
    model.init_whitening(images)
    weight = model.whiten.weight.detach().double().reshape(24, 12)
    whitened = patches @ weight[:12].T
    covariance = torch.cov(whitened.T)
    # eigenvalue / (eigenvalue + eps) on the diagonal: 1 within the eps of the smallest
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=2e-2)
    assert torch.equal(weight[12:], -weight[:12])  # both signs pass the GELU
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad


def test_other_convolutions_start_as_the_identity_and_norms_have_a_frozen_scale():
    model = r.prepare_model(build_model('airbench94_small'), FAST, None)
    group = model.groups[1]  # 32 -> 64 channels, 64 -> 64
    x = torch.randn(2, 32, 8, 8)
    assert torch.allclose(group.conv1(x)[:, :32], x, atol=1e-6)
    y = torch.randn(2, 64, 8, 8)
    assert torch.allclose(group.conv2(y), y, atol=1e-6)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad
                                   and m.momentum == 0.4 for m in norms)
    # the scales are the recipe's to freeze: under another recipe they train
    assert all(p.requires_grad for p in build_model('airbench94_small').parameters())
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule, lookahead

def test_parameter_groups_get_the_per_1024_learning_rates_and_decay():
    model = r.prepare_model(build_model('airbench94_small'), FAST, None)
    model.init_whitening(training_images(100))
    recipe = replace(FAST, batch_size=512)
    groups = {g['group']: g for g in r.param_groups(model, recipe)}
    scale = 1024 * (1 + 1 / (1 - 0.85))
    lr = 11.5 * 512 / scale
    assert groups['other']['lr'] == pytest.approx(lr)
    assert groups['norm_bias']['lr'] == pytest.approx(64 * lr)
    assert groups['whitening_bias']['lr'] == pytest.approx(64 * lr)
    for g in groups.values():  # every group shrinks by the same share per step
        assert g['lr'] * g['weight_decay'] == pytest.approx(0.0153 * 512 / scale)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups.values() for p in g['params']]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter once; frozen ones not
    assert [id(p) for p in groups['whitening_bias']['params']] == [id(model.whiten.bias)]
    assert len(groups['norm_bias']['params']) == 6

    optimizer = r.make_optimizer(model, recipe)
    steps_per_epoch = 10
    r.set_learning_rates(optimizer, recipe, 29, steps_per_epoch)  # the last step of epoch 3
    by_name = {g['group']: g for g in optimizer.param_groups}
    assert by_name['whitening_bias']['lr'] == by_name['norm_bias']['lr'] > 0
    r.set_learning_rates(optimizer, recipe, 30, steps_per_epoch)  # its bias trained 3 epochs
    assert by_name['whitening_bias']['lr'] == 0 and by_name['norm_bias']['lr'] > 0

    # a model without frozen-scale norms (cnn) has one group; the standard recipe always one
    assert [g['group'] for g in r.param_groups(build_model('cnn'), FAST)] == ['other']
    standard, = r.param_groups(build_model('cnn'), r.Recipe(lr=0.2, weight_decay=1e-3))
    assert (standard['lr'], standard['weight_decay']) == (0.2, 1e-3)


def test_the_triangular_schedule_rises_to_its_peak_and_falls_linearly():
    recipe, steps_per_epoch = FAST, 48
    total = recipe.epochs * steps_per_epoch
    factors = np.array([r.learning_rate(recipe, 1.0, s, steps_per_epoch) for s in range(total + 1)])
    peak = int(0.23 * total)
    assert factors[0] == pytest.approx(0.2)
    assert factors[peak] == pytest.approx(1.0) and factors.argmax() == peak
    assert factors[total] == pytest.approx(0.07)
    rise, fall = np.diff(factors[:peak + 1]), np.diff(factors[peak:])
    assert np.allclose(rise, 0.8 / peak) and np.allclose(fall, -0.93 / (total - peak))


def test_lookahead_updates_every_5_steps_and_after_the_last_with_the_cubic_decay():
    recipe, total = FAST, 12
    assert r.lookahead_decay_at(recipe, 5, total) == pytest.approx(0.95 ** 5 * (5 / 12) ** 3)
    module = torch.nn.Linear(2, 1)
    lookahead = r.Lookahead(module)
    slow = {k: v.clone() for k, v in module.state_dict().items()}
    updates = []
    for step in range(1, total + 1):
        with torch.no_grad():
            module.weight.add_(1.0)  # a "training step"
        fast = {k: v.clone() for k, v in module.state_dict().items()}
        r.lookahead_step(lookahead, module, recipe, step, total)
        if step in (5, 10, 12):
            decay = 0.95 ** 5 * (step / total) ** 3
            slow = {k: decay * slow[k] + (1 - decay) * fast[k] for k in slow}
            updates.append(step)
            for k, v in module.state_dict().items():  # the module becomes the slow weights
                assert torch.allclose(v, slow[k]), (step, k)
        else:
            assert all(torch.equal(v, fast[k]) for k, v in module.state_dict().items())
    assert updates == [5, 10, 12]


# ---------------------------------------------------------------------------------------------
# Augmentation and test-time augmentation

def reflect(i, n):
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def test_tta_is_the_weighted_mean_of_its_six_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    images = torch.randn(3, 3, 8, 8)
    single, averaged = r.tta_logits(model, images)

    def shifted(dy, dx):  # content moved by (dy, dx), the border reflected
        rows = [reflect(i - dy, 8) for i in range(8)]
        cols = [reflect(j - dx, 8) for j in range(8)]
        return images[:, :, rows][:, :, :, cols]

    views = [(0.25, images), (0.125, shifted(1, 1)), (0.125, shifted(-1, -1))]
    expected = sum(w * (model(x) + model(x.flip(-1))) for w, x in views)
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert torch.equal(single, model(images))
    assert sum(w for w, _ in r.tta_views(images)) == pytest.approx(1.0)


def test_predict_views_gives_the_single_view_of_predict_and_the_tta_accuracy(cifar_dir):
    data = make_loaders(cifar_dir, 32, val_fraction=0.0, eval_batch_size=40, download=False)
    model = build_model('airbench94_small').eval()
    single, averaged, labels = predict_views(model, data.test)
    plain, plain_labels = predict(model, data.test)
    assert torch.equal(single, plain) and torch.equal(labels, plain_labels)
    expected = torch.cat([r.tta_logits(model, x)[1] for x, _ in data.test])
    assert torch.allclose(averaged, expected)


def distinct_images(n):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_alternate_flip_flips_each_image_in_exactly_every_other_epoch():
    n, epochs = 64, 5
    images = distinct_images(n)
    loader = CifarLoader(images, torch.arange(n), 16, train=True, seed=4, padding=0,
                         flip='alternate')
    plain = loader.normalize(images)
    flipped = np.zeros((epochs, n), dtype=bool)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, labels in loader:
            for image, i in zip(x, labels.tolist()):
                if torch.equal(image, plain[i]):
                    flipped[epoch, i] = False
                else:
                    assert torch.equal(image, plain[i].flip(-1))
                    flipped[epoch, i] = True
    assert 0.25 < flipped[0].mean() < 0.75          # epoch 0: at random
    assert (flipped[1:] != flipped[:-1]).all()      # then every image alternates
    # a loader made afresh (a resumed run) flips the same images in the same epoch
    again = CifarLoader(images, torch.arange(n), 16, train=True, seed=4, padding=0,
                        flip='alternate')
    assert torch.equal(again.first_epoch_flips(), loader.first_epoch_flips())


def test_the_translation_is_a_crop_of_the_reflect_padded_image():
    n = 32
    images = distinct_images(n)
    loader = CifarLoader(images, torch.arange(n), n, train=True, seed=0, padding=2,
                         padding_mode='reflect', flip='random')
    x, labels = next(iter(loader))
    padded = loader.normalize(F.pad(images, (2, 2, 2, 2), mode='reflect'))
    offsets = set()
    for image, i in zip(x, labels.tolist()):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if torch.equal(image, (lambda c: c.flip(-1) if flip else c)(
                       padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, i
        offsets.add(matches[0])
    assert len(offsets) > 5  # really translated, and not by one fixed offset


# ---------------------------------------------------------------------------------------------
# Losses and training under the recipe

def test_the_hard_label_term_uses_the_recipes_label_smoothing():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    trainee = Trainee('student_kd', build_model('cnn'), 'kd', FAST, CPU, options=TraineeOptions(
        loss_params={'temperature': 4.0, 'alpha': 0.3}))
    loss, parts = trainee.compute_loss(s, t, y, epoch=1)
    smooth = torch.full((8, 10), 0.02).scatter(1, y[:, None], 0.82)
    ce = -(smooth * F.log_softmax(s, 1)).sum(1).mean()
    kl = (F.softmax(t / 4, 1) * (F.log_softmax(t / 4, 1) - F.log_softmax(s / 4, 1))).sum(1).mean()
    assert parts['ce'].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * 16 * kl.item(), rel=1e-5)
    base = Trainee('student_base', build_model('cnn'), 'ce', FAST, CPU)
    assert base.compute_loss(s, None, y, 1)[0].item() == pytest.approx(ce.item(), rel=1e-5)
    # the standard recipe: plain cross-entropy
    plain = Trainee('b', build_model('cnn'), 'ce', r.Recipe(), CPU)
    assert plain.compute_loss(s, None, y, 1)[0].item() == pytest.approx(
        F.cross_entropy(s, y).item(), rel=1e-6)
    assert 'label smoothing: fast 0.2, reference 0, standard 0' in main.build_parser().format_help() \
        .replace('\n', ' ').replace('  ', ' ')
    assert get_loss('dkd').fn(s, t, y, label_smoothing=0.2)[1]['ce'].item() == pytest.approx(
        ce.item(), rel=1e-5)


@pytest.mark.parametrize('arch', ['cnn', 'wrn_16_2'])
def test_other_models_train_under_the_fast_recipe(arch):
    recipe = replace(FAST, batch_size=16)
    torch.manual_seed(0)
    trainee = Trainee('student_base', build_model(arch), 'ce', recipe, CPU)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = copy.deepcopy(trainee.module.state_dict())
    r.set_learning_rates(trainee.optimizer, recipe, 0, 10)
    (result,) = train_step([trainee], None, images, labels, recipe)
    assert torch.isfinite(result.loss)
    changed = [k for k, v in trainee.module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and trainee.lookahead is not None


class StopAfter:
    """A stop request that arrives before the `after`-th batch check (a Ctrl-C mid-epoch)."""

    def __init__(self, after):
        self.after, self.checks, self.signum = after, 0, None
        self.saved = {}  # what train_phase reports as saved (StopSignal's)

    @property
    def requested(self):
        self.checks += 1
        if self.checks > self.after:
            self.signum = 15
        return self.signum is not None


def fast_run(data, recipe, out, stop=None, resume_state=None):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    first = r.prepare_model(build_model('airbench94_small'), recipe, data.train)
    second = r.prepare_model(build_model('airbench94_small'), recipe, data.train, like=first)
    trainees = [Trainee('a', first, 'ce', recipe, CPU), Trainee('b', second, 'kd', recipe, CPU)]
    teacher = build_model('airbench94_small').eval()
    summary = train_phase('students', trainees, data, recipe,
                          PhaseFiles(str(out), resume_state=resume_state),
                          teacher=PhaseTeacher(teacher),
                          options=LoopOptions(CPU, test_every=1, runs_ahead=0,
                                              progress_bar=False),
                          callbacks=LoopCallbacks(log=lambda *_: None, stop=stop))
    return trainees, summary


def test_a_resumed_fast_run_equals_an_uninterrupted_one(cifar_dir, tmp_path):
    recipe = replace(FAST, epochs=3, batch_size=16, whiten_bias_epochs=1)
    data = make_loaders(cifar_dir, 16, val_fraction=0.1, eval_batch_size=60, download=False,
                        subset=60, **r.loader_options(recipe))  # 3 steps per epoch
    whole, summary = fast_run(data, recipe, tmp_path / 'whole')
    # stop in the middle of the last epoch, 2 steps after a lookahead update (at step 5), with
    # the whitening bias frozen since step 3
    with pytest.raises(TrainingInterrupted):
        fast_run(data, recipe, tmp_path / 'cut', stop=StopAfter(7))
    state = torch.load(tmp_path / 'cut' / 'last_students.pt', weights_only=True)
    assert (state['epoch'], state['batch']) == (2, 1) and 'lookahead' in state
    assert not all(torch.equal(v, state['models']['a'][k])
                   for k, v in state['lookahead']['a'].items())
    resumed, resumed_summary = fast_run(data, recipe, tmp_path / 'cut', resume_state=state)
    for a, b in zip(whole, resumed):
        for k, v in a.module.state_dict().items():
            assert torch.equal(v, b.module.state_dict()[k]), (a.name, k)
    for name in ('a', 'b'):
        for key in ('test_acc', 'test_acc_tta', 'val_acc_tta', 'best_epoch'):
            assert summary['models'][name][key] == resumed_summary['models'][name][key]
    assert summary['models']['a']['best_epoch'] == 3  # the recipe keeps the last epoch


# ---------------------------------------------------------------------------------------------
# The command line, through the benchmark of the whole workflow

def test_students_under_the_fast_recipe_are_not_stacked_and_say_why():
    trainees = [Trainee(n, r.prepare_model(build_model('airbench94_small'), FAST, None), 'ce',
                        FAST, CPU) for n in 'ab']
    assert "lookahead" in stacking_problem(trainees, multi_process=False, compiled=False)


@pytest.mark.slow
def test_the_fast_workflow_through_its_benchmark_and_the_command_line(cifar_dir, tmp_path):
    work, out_json = tmp_path / 'work', tmp_path / 'fast.json'
    bench = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench', 'fast_bench.py'), '--data-dir', cifar_dir,
         '--subset', '100', '--epochs', '2', '--seeds', '0', '--skip', 'a', 'd',
         '--work-dir', str(work), '--json', str(out_json), '--main-flags=--no-amp'],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    assert bench.returncode == 0, bench.stdout + bench.stderr
    with open(out_json) as f:
        measured = json.load(f)
    assert list(measured['steps']) == ['b', 'c'] and measured['smoke']
    assert measured['machine']['cpu'] and measured['machine']['omp_num_threads'] == '1'
    teacher_step, students_step = measured['steps']['b'], measured['steps']['c']
    assert teacher_step['command'].startswith('python main.py --recipe fast')
    assert teacher_step['wall_seconds'] > 0 and set(teacher_step['models']) == {'teacher'}
    assert set(students_step['models']) == {'student_kd', 'student_base'}
    assert 'student_kd' in students_step['gains'] and 'student_kd' in students_step['gains_tta']
    assert "## The fast recipe's workflow" in bench.stdout and 'A smoke run' in bench.stdout

    study = work / 'study'
    with open(study / 'results.json') as f:
        results = json.load(f)
    config = results['phases']['students']['config']
    assert config['recipe'] == 'fast' and config['recipe_values']['label_smoothing'] == 0.2
    assert (config['epochs'], config['batch_size'], config['lr']) == (2, 1024, 11.5)  # --epochs won
    models = results['models']
    assert models['teacher']['arch'] == 'airbench94'
    assert models['student_kd']['arch'] == models['student_base']['arch'] == 'airbench94_small'
    for name, entry in models.items():
        assert entry['best_epoch'] in (2, [2])   # the last epoch is kept (one seed)
        assert students_step['models'].get(name, teacher_step['models'].get(name))[
            'test_acc_tta'] == entry['test_acc_tta']
        for key in ('test_acc', 'test_acc_tta', 'val_acc_tta'):
            assert 0 <= entry[key] <= 100, (name, key)
    with open(study / 'seed0' / 'log_student_kd.csv') as f:
        header, first, last = f.read().splitlines()
    assert 'val_acc_tta,test_acc_tta' in header
    columns = dict(zip(header.split(','), last.split(',')))
    assert float(columns['test_acc_tta']) == models['student_kd']['test_acc_tta']
    assert dict(zip(header.split(','), first.split(',')))['test_acc'] == ''  # tested at the end
    with open(study / 'best_student_kd.json') as f:
        record = json.load(f)
    assert (record['recipe'], record['precision']) == ('fast', 'fp32')
    with open(study / 'results.md') as f:
        md = f.read()
    assert 'Test acc., TTA (%)' in md and "keeps the last epoch's weights" in md
    assert 'it selects the checkpoints' not in md   # under fast it does not

    # --evaluate reads the recipe from the records and reports TTA beside the single view
    evaluated = run_cli('--evaluate', '--data-dir', cifar_dir, '--out-dir', study,
                        '--subset', '100', '--device', 'cpu', '--no-amp')
    assert evaluated.returncode == 0, evaluated.stderr
    assert 'Test acc. TTA' in evaluated.stdout
    row = next(line for line in evaluated.stdout.splitlines() if line.startswith('Student (KD)'))
    assert row.split()[-1] == f"{models['student_kd']['test_acc_tta']:.2f}"


def test_a_teacher_without_a_record_is_taken_to_be_the_recipes_teacher(tmp_path):
    """A bare state_dict (no best_teacher.json beside it) under --recipe fast is rebuilt as the
    fast recipe's teacher, airbench94, not the standard recipe's resnet18."""
    from kd.run.teacher import load_teacher
    torch.manual_seed(0)
    reference = build_model('airbench94')
    path = tmp_path / 'teacher.pth'
    torch.save(reference.state_dict(), path)
    split = {'dataset': 'cifar10', 'split_seed': 0, 'val_fraction': 0.1}
    fast, standard = (main.parse_config(['--recipe', r]).recipe for r in ('fast', 'standard'))
    model, arch, _, record = load_teacher(str(path), CPU, 10,
                                          default_arch=fast.teacher_arch, split=split)
    assert (arch, record) == ('airbench94', None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # channels_last sums in another order
        assert torch.allclose(model(x), reference.eval()(x), atol=1e-5)
    with pytest.raises(Exception, match='airbench94, not of a resnet18'):
        load_teacher(str(path), CPU, 10, default_arch=standard.teacher_arch, split=split)


def test_evaluate_runs_each_checkpoint_in_the_precision_its_run_tested_it_in():
    """bf16 and fp32 round differently: --evaluate reproduces a run's test accuracy only in the
    recorded precision, so it uses it unless --amp / --no-amp say otherwise, and says so."""
    from kd.run.evaluate import evaluation_precision
    said = []
    assert evaluation_precision({'precision': 'bf16'}, False, CPU, None, said.append) \
        == torch.bfloat16
    assert said == ['precision: bf16, as its run tested it (--amp / --no-amp choose another)']
    said.clear()
    assert evaluation_precision({'precision': 'bf16'}, True, CPU, False, said.append) is None
    assert evaluation_precision({'precision': 'fp32'}, False, CPU, None, said.append) is None
    assert evaluation_precision({}, False, CPU, None, said.append) is None      # older records
    assert evaluation_precision(None, False, CPU, None, said.append) is None
    assert evaluation_precision({'precision': 'fp16'}, False, CPU, None, said.append) is None
    assert said == []
