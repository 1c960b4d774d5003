"""The run configuration: one frozen object resolved in one place, never changed by a run, every
default with one home, and what runs printed and recorded from it."""
import dataclasses
import json
import os
import re

import pytest
import torch

import main
from kd import recipes as recipe
from kd.run.config import FLAGS, RunConfig, UsageError, flag_args
from kd.methods.registry import LOSSES
from kd.run.configuration import resolved_configuration
from kd.run.runner import run
from kd.run.specs import phase_specs
from kd.engine.trainee import Trainee

CPU = torch.device('cpu')

RECORD_KEYS = ['dataset', 'num_classes', 'epochs', 'batch_size', 'lr', 'weight_decay',
               'val_fraction', 'split_seed', 'subset', 'test_every', 'data_dir', 'out_dir',
               'compile']


@pytest.mark.parametrize('argv, expected', [
    ([], dict(dataset='cifar10', num_classes=10, epochs=200, batch_size=128, lr=0.1,
              weight_decay=5e-4, val_fraction=0.1, split_seed=0, subset=None, test_every=1,
              data_dir='./data', out_dir='.', compile=False)),
    # the fast recipe's lr is per 1,024 images (no scaling) and it tests at the last epoch only
    (['--recipe', 'fast', '--dataset', 'cifar100', '--subset', '500', '--batch-size', '512'],
     dict(dataset='cifar100', num_classes=100, epochs=10, batch_size=512, lr=11.5,
          weight_decay=0.0153, val_fraction=0.1, split_seed=0, subset=500, test_every=10,
          data_dir='./data', out_dir='.', compile=False)),
    # the standard lr follows the batch: 0.1 x 256 / 128
    (['--train-teacher', '--batch-size', '256', '--epochs', '3', '--test-every', '2',
      '--val-fraction', '0.2', '--split-seed', '4', '--compile', '--out-dir', 'o',
      '--data-dir', 'd'],
     dict(dataset='cifar10', num_classes=10, epochs=3, batch_size=256, lr=0.2,
          weight_decay=5e-4, val_fraction=0.2, split_seed=4, subset=None, test_every=2,
          data_dir='d', out_dir='o', compile=True)),
])
def test_record_keys_unchanged(argv, expected):
    """The recorded keys (results.json, the resume state's config) and their values are those
    runs recorded before the configuration was one object, so old states still resume."""
    record = main.parse_config(argv).record()
    assert list(record) == RECORD_KEYS
    assert record == expected


def test_run_never_mutates_the_config(cifar_dir, tmp_path):
    """run() leaves its RunConfig as it was, although the run resolves the effective --subset
    (1000 of 200 images: all, recorded as no subset); the object cannot be changed at all."""
    out = tmp_path / 'out'
    config = main.parse_config(['--train-teacher', '--teacher-arch', 'cnn', '--epochs', '1',
                                '--subset', '1000', '--batch-size', '64', '--device', 'cpu',
                                '--no-amp', '--data-dir', cifar_dir, '--out-dir', str(out)])
    before = dataclasses.replace(config)
    lines = []
    assert run(config, log=lines.append) == 0
    assert config == before and config.subset == 1000
    with open(out / 'results.json') as f:
        recorded = json.load(f)['phases']['teacher']['config']
    assert recorded['subset'] is None   # what ran: every image
    assert recorded['configuration']['subset'] == 'all'
    assert {k: recorded[k] for k in RECORD_KEYS} == dict(config.record(), subset=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.subset = None


@pytest.mark.parametrize('argv, message', [
    (['--alpha', '1.5'], '--alpha must be in [0, 1], got 1.5'),
    (['--temperature', '0'], '--temperature must be > 0, got 0.0'),
    (['--loss', 'kd', 'kd'], '--loss must not repeat a value'),
    (['--temperature', '2', '2'], '--temperature must not repeat a value'),
    (['--beta', '-1'], '--beta must be >= 0, got -1.0'),
    (['--beta', '1', '1'], '--beta must not repeat a value'),
    (['--lr', '-1'], '--lr must be >= 0, got -1.0'),
    (['--weight-decay', '-0.1'], '--weight-decay must be >= 0, got -0.1'),
    (['--val-fraction', '1'], '--val-fraction must be in [0, 1), got 1.0'),
    (['--seed', '-1'], '--seed and --seeds must be >= 0'),
    (['--seed', '-1', '--seeds', '0', '1'], '--seed and --seeds must be >= 0'),
    (['--seeds', '0', '-2'], '--seed and --seeds must be >= 0'),
    (['--split-seed', '-1'], '--split-seed must be >= 0, got -1'),
    (['--seeds', '1', '1'], '--seeds must not repeat a seed'),
    (['--resume', '--restart'], '--resume and --restart exclude each other'),
    (['--evaluate', '--train-teacher'], '--evaluate and --train-teacher exclude each other'),
])
def test_bad_values_keep_their_messages(argv, message, capsys, tmp_path):
    """Each bad value is refused by the one constructor with its message and exit code 2,
    before anything is read or written; main.validate (a thin wrapper) says the same."""
    argv = argv + ['--out-dir', str(tmp_path / 'out')]
    assert main.main(argv) == 2
    assert capsys.readouterr().err == f'error: {message}\n'
    assert not os.path.exists(tmp_path / 'out')
    with pytest.raises(UsageError, match=f'^{re.escape(message)}$'):
        main.validate(main.build_parser().parse_args(argv))


def test_every_default_has_one_home():
    """The parser's defaults are recipe.DEFAULTS; the losses' hyper-parameters come from the
    loss registry alone (the recipe has none); the lr formula is recipe.scaled_lr."""
    actions = [a for a in main.build_parser()._actions if a.dest != 'help']
    assert {a.dest for a in actions} == set(recipe.DEFAULTS)
    for action in actions:
        default = recipe.DEFAULTS[action.dest]
        assert action.default == (list(default) if isinstance(default, tuple) else default), \
            action.dest
    assert not {'temperature', 'alpha'} & {f.name for f in dataclasses.fields(recipe.Recipe)}
    assert not hasattr(recipe, 'default_lr')
    # every loss's students take its registry defaults when --temperature / --alpha are open
    config = main.parse_config(['--loss', 'kd', 'dkd', 'ls', 'fitnet'])
    assert {s.loss: s.params for s in phase_specs(config)} == {
        'kd': {'temperature': 4.0, 'alpha': 0.1}, 'dkd': {'temperature': 4.0},
        'ls': {'temperature': 2.0, 'alpha': 0.1}, 'fitnet': {'beta': 100.0}, 'ce': {}}
    assert {n: dict(LOSSES[n].defaults) for n in ('kd', 'dkd', 'ls', 'fitnet')} == {
        s.loss: s.params for s in phase_specs(config) if s.loss != 'ce'}
    # the public convention: plain `python main.py` is `--temperature 4 --alpha 0.1`
    assert phase_specs(main.parse_config([]))[0].params == phase_specs(main.parse_config(
        ['--temperature', '4', '--alpha', '0.1']))[0].params == {'temperature': 4.0, 'alpha': 0.1}
    # one lr formula: the resolved lr and the printed note on it
    config = main.parse_config(['--batch-size', '256'])
    assert config.lr == recipe.scaled_lr(recipe.get_recipe('standard'), 256) == 0.2
    view = resolved_configuration(config, CPU, specs=phase_specs(config), teacher_arch='resnet18')
    assert view['lr'] == '0.2 (0.1 x batch size 256 / 128)'
    assert main.parse_config(['--recipe', 'fast', '--batch-size', '256']).lr == 11.5


@pytest.mark.parametrize('loss, expected', [
    ('ls', {'temperature': 2.0, 'alpha': 0.1}), ('kd', {'temperature': 4.0, 'alpha': 0.1}),
    ('dkd', {'temperature': 4.0}), ('ce', {})])
def test_trainee_takes_the_registry_defaults(loss, expected):
    """A Trainee built outside the command line without loss parameters trains what
    `python main.py --loss NAME` trains (ls: T=2, not kd's 4)."""
    trainee = Trainee('s', torch.nn.Conv2d(3, 2, 1), loss, recipe.get_recipe('standard'), CPU)
    assert trainee.loss_params == expected
    if loss != 'ce':
        cli = phase_specs(main.parse_config(['--loss', loss]))[0]
        assert trainee.loss_params == cli.params


@pytest.mark.parametrize('argv', [
    [],
    ['--train-teacher', '--teacher-arch', 'resnet32x4', '--dataset', 'cifar100', '--epochs', '3',
     '--batch-size', '256', '--seed', '3', '--no-amp', '--compile', '--subset', '500'],
    ['--loss', 'kd', 'dkd', '--temperature', '2', '4', '--alpha', '0.3', '--seeds', '0', '1',
     '--teacher-checkpoint', 't.pth', '--student-arch', 'resnet8x4', '--no-baseline', '--amp',
     '--lr', '0.05', '--weight-decay', '0.001', '--test-every', '5', '--val-fraction', '0',
     '--split-seed', '2', '--stack-students', 'off', '--resume', '--tensorboard',
     '--data-dir', 'my data', '--out-dir', 'runs/a', '--device', 'cpu'],
    ['--evaluate', '--recipe', 'fast', '--restart', '--subset', '100'],
    ['--loss', 'fitnet', 'at', '--beta', '50', '500'],
    ['--loss', 'rkd', 'dist', 'kd', '--gamma', '10', '50', '--logit-standardization', 'off', 'on'],
])
def test_flag_args_round_trips(argv):
    """flag_args gives back a command line that resolves to the same configuration (what the
    printed quick-run, fast-recipe and confirm commands rely on)."""
    config = main.parse_config(argv)
    assert isinstance(config, RunConfig)
    assert main.parse_config(flag_args(config, FLAGS)) == config


def test_gamma_and_the_switch_from_the_command_line():
    """--gamma and --logit-standardization make grids of the losses that take them, say so in
    the configuration, and refuse bad values (exit 2)."""
    from kd.run.configuration import describe_loss_settings, loss_settings
    from kd.run.specs import student_specs
    config = main.parse_config(['--loss', 'kd', 'rkd', 'fitnet', '--gamma', '10', '50',
                                '--logit-standardization', 'off', 'on'])
    specs = student_specs(config)
    assert [s.name for s in specs] == ['kd_T4_a0.1', 'kd_T2_a0.1_ls', 'rkd_b25_g10',
                                       'rkd_b25_g50', 'fitnet_b100', 'student_base']
    assert specs[1].params == {'temperature': 2.0, 'alpha': 0.1, 'logit_standardization': True}
    lines = describe_loss_settings(loss_settings(specs), ['gamma', 'logit_standardization'])
    assert lines == [
        'kd: T=4, 2, alpha=0.1 (its default), logit standardisation=off, on, '
        '--gamma does not apply',
        'rkd: beta=25 (its default), gamma=10, 50, --logit-standardization does not apply',
        'fitnet: beta=100 (its default), --gamma does not apply, '
        '--logit-standardization does not apply']
    for argv, message in ((['--gamma', '-1'], '--gamma must be >= 0'),
                          (['--gamma', '2', '2'], '--gamma must not repeat'),
                          (['--logit-standardization', 'on', 'on'],
                           '--logit-standardization must not repeat')):
        with pytest.raises(UsageError, match=message):
            main.parse_config(['--loss', 'rkd', *argv])
    with pytest.raises(UsageError, match="invalid choice: 'yes'"):
        main.parse_config(['--logit-standardization', 'yes'])
