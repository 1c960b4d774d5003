"""Each method's settings are declared with it (kd/methods/registry.py) and reached with
`--set METHOD.NAME=VALUE[,VALUE...]`: the grid, the names, the refusals, the round trips of
the printed commands, and the values reaching the losses and the feature methods."""
import os
import re

import pytest
import torch

import main
from kd.methods.base import BuildContext
from kd.methods.grid import SetValues, expand_grid, parse_sets, setting_args, setting_name
from kd.methods.losses import dkd_loss
from kd.methods.plan import build_distiller
from kd.methods.registry import HYPER, LOSSES, HyperParameter, get_loss, register_loss
from kd.run.config import FLAGS, UsageError, flag_args
from kd.run.configuration import describe_loss_settings, loss_settings
from kd.run.specs import student_specs


def names_and_params(argv):
    return [(s.name, s.params) for s in student_specs(main.parse_config(argv))]


def test_set_makes_a_grid_of_a_declared_setting():
    assert names_and_params(['--loss', 'fitnet', '--set', 'fitnet.beta=50,100']) == [
        ('fitnet_b50', {'beta': 50.0}), ('fitnet_b100', {'beta': 100.0}),
        ('student_base', {})]
    # over the shared flag, for that method only
    assert names_and_params(['--loss', 'fitnet', 'at', '--beta', '7', '--set',
                             'fitnet.beta=50', '--no-baseline']) == [
        ('fitnet_b50', {'beta': 50.0}), ('at_b7', {'beta': 7.0})]


def test_a_constant_is_named_only_away_from_its_default():
    """dkd's warm-up is a constant of the method: at its default (20) the setting keeps today's
    name and params, so old runs' names and files are unchanged."""
    assert names_and_params(['--loss', 'dkd', '--set', 'dkd.warmup=10,20', '--no-baseline']) == [
        ('dkd_T4_w10', {'temperature': 4.0, 'warmup': 10}), ('dkd_T4', {'temperature': 4.0})]
    assert names_and_params(['--loss', 'dkd', 'crd', '--set', 'crd.k=4096', '--set',
                             'dkd.warmup=20', '--logit-standardization', 'on',
                             '--no-baseline']) == [
        ('dkd_T2_ls', {'temperature': 2.0, 'logit_standardization': True}),
        ('crd_b0.8_k4096', {'beta': 0.8, 'k': 4096})]
    # one setting keeps the name student_kd
    assert names_and_params(['--loss', 'dkd', '--set', 'dkd.warmup=5']) == [
        ('student_kd', {'temperature': 4.0, 'warmup': 5}), ('student_base', {})]
    assert setting_name('dkd', {'temperature': 4.0, 'warmup': 20}) == 'dkd_T4'


def test_every_method_declares_defaults_that_are_todays():
    """The constants that were module constants are declared settings with today's values."""
    expected = {'dkd': {'warmup': 20, 'tckd_weight': 1.0, 'nckd_weight': 8.0},
                'fitnet': {'hint': 2}, 'at': {'p': 2}, 'vid': {'init_var': 5.0},
                'crd': {'dim': 128, 'k': 16384, 'tau': 0.07, 'momentum': 0.5},
                'reviewkd': {'warmup': 20, 'mid_channels': 512}, 'kdsvd': {'k': 1}}
    for name, own in expected.items():
        settings = get_loss(name).settings
        assert {k: h.default for k, h in settings.items() if k not in HYPER} == own, name
        assert all(not h.axis and h.help for k, h in settings.items() if k not in HYPER)
    assert get_loss('dkd').warmup_epochs == get_loss('reviewkd').warmup_epochs == 20
    assert get_loss('dkd').warmup_for({'warmup': 5}) == 5
    # the shared knobs keep their ranges and marks
    assert [(h.symbol, h.range_text()) for h in HYPER.values()] == [
        ('T', '> 0'), ('a', 'in [0, 1]'), ('b', '>= 0'), ('g', '>= 0'), ('ls', '')]


@pytest.mark.parametrize('argv, message', [
    (['--set', 'nope.beta=1'], "--set nope.beta=1: unknown method 'nope'; known methods: kd, "),
    (['--loss', 'fitnet', '--set', 'fitnet.alpha=1'],
     "--set fitnet.alpha=1: fitnet has no setting 'alpha'; its settings: beta, hint"),
    (['--loss', 'fitnet', '--set', 'fitnet.beta=-1'],
     '--set fitnet.beta=-1: beta must be a number >= 0, got -1'),
    (['--loss', 'fitnet', '--set', 'fitnet.hint=2.5'],
     "--set fitnet.hint=2.5: hint must be an integer, got '2.5'"),
    (['--loss', 'kd', '--set', 'kd.alpha=x'], "--set kd.alpha=x: alpha must be a number, got 'x'"),
    (['--loss', 'kd', '--set', 'kd.alpha=1.5'],
     '--set kd.alpha=1.5: alpha must be a number in [0, 1], got 1.5'),
    (['--loss', 'kd', '--set', 'kd.temperature=0'],
     '--set kd.temperature=0: temperature must be a number > 0, got 0'),
    (['--loss', 'kd', '--set', 'kd.temperature'],
     "--set takes METHOD.NAME=VALUE[,VALUE...] (e.g. fitnet.beta=50,100), got 'kd.temperature'"),
    (['--loss', 'kd', '--set', 'kd.alpha=0.1,0.1'], '--set kd.alpha=0.1,0.1: a value is repeated'),
    (['--loss', 'kd', '--set', 'kd.alpha=0.1', '--set', 'kd.alpha=0.2'],
     '--set kd.alpha is given twice; give its values once, separated by commas'),
    (['--loss', 'kd', '--set', 'dkd.warmup=5'],
     '--set dkd.warmup: --loss does not train dkd (it trains kd)'),
])
def test_set_refusals_exit_2_with_one_line_and_write_nothing(argv, message, capsys, tmp_path):
    out = tmp_path / 'out'
    assert main.main(argv + ['--out-dir', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {message}') and err.count('\n') == 1
    assert not os.path.exists(out)
    with pytest.raises(UsageError, match=re.escape(message)):
        main.parse_config(argv)


def test_set_round_trips_through_the_printed_commands():
    """flag_args gives --set back exactly (the quick-run, fast-recipe and resume commands),
    and setting_args trains one setting alone (the confirm-over-seeds command)."""
    argv = ['--loss', 'dkd', 'crd', '--set', 'dkd.warmup=10,20', '--set',
            'crd.tau=0.1234567,0.07', '--temperature', '2']
    config = main.parse_config(argv)
    assert config.sets == (SetValues('dkd', 'warmup', (10, 20)),
                           SetValues('crd', 'tau', (0.1234567, 0.07)))
    assert main.parse_config(flag_args(config, FLAGS)) == config
    assert flag_args(config, ('sets',)) == ['--set', 'dkd.warmup=10,20',
                                            '--set', 'crd.tau=0.1234567,0.07']
    for spec in student_specs(config)[:-1]:
        again = student_specs(main.parse_config(['--loss', spec.loss,
                                                 *setting_args(spec.loss, spec.params)]))
        assert (again[0].loss, again[0].params) == (spec.loss, spec.params)
    assert setting_args('dkd', {'temperature': 2.0, 'warmup': 10}) == [
        '--temperature', '2.0', '--set', 'dkd.warmup=10']
    # the switch is reachable per method too
    assert parse_sets(['kd.logit_standardization=off,on'])[0].values == (False, True)


def test_the_printed_configuration_names_the_set_values():
    specs = student_specs(main.parse_config(['--loss', 'dkd', 'fitnet', '--set',
                                             'dkd.warmup=10', '--set', 'fitnet.hint=3']))
    assert describe_loss_settings(loss_settings(specs)) == [
        'dkd: T=4 (its default), warmup=10', 'fitnet: beta=100 (its default), hint=3']
    # a constant's default among the values given is said too (its settings leave it out)
    specs = student_specs(main.parse_config(['--loss', 'dkd', '--set', 'dkd.warmup=1,20']))
    assert describe_loss_settings(loss_settings(specs)) == ['dkd: T=4 (its default), warmup=1, 20']


def test_the_values_reach_the_methods():
    # dkd: the warm-up ramp and the two weights
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    y = torch.arange(6) % 5
    full, parts = dkd_loss(s, t, y, epoch=40)
    half, _ = dkd_loss(s, t, y, epoch=5, warmup=10)
    assert torch.allclose(half - parts['ce'], (full - parts['ce']) / 2)
    weighted, _ = dkd_loss(s, t, y, epoch=40, tckd_weight=2.0, nckd_weight=0.0)
    assert torch.allclose(weighted, parts['ce'] + 2 * parts['tckd'])
    no_ramp, _ = dkd_loss(s, t, y, epoch=1, warmup=0)
    assert torch.allclose(no_ramp, full)
    # feature methods get every setting, defaults filled in
    shapes = {'stage1': torch.Size((1, 4, 8, 8)), 'stage2': torch.Size((1, 8, 4, 4)),
              'stage3': torch.Size((1, 8, 2, 2)), 'pooled': torch.Size((1, 8))}
    context = BuildContext(shapes, shapes, torch.arange(50) % 5, 5)
    fitnet = build_distiller('fitnet', {'beta': 100.0, 'hint': 3}, context)
    assert fitnet.student_points == fitnet.teacher_points == ('stage3',)
    assert build_distiller('fitnet', {}, context).params == {'beta': 100.0, 'hint': 2}
    crd = build_distiller('crd', {'k': 7, 'dim': 16, 'tau': 0.5, 'momentum': 0.25}, context)
    assert crd.memory_s.shape == (50, 16)
    assert (crd.nce_k, crd.nce_t, crd.nce_m) == (7, 0.5, 0.25)
    with pytest.raises(ValueError, match="no hint layer 'stage4'"):
        build_distiller('fitnet', {'hint': 4}, context)


def test_a_declaration_is_checked_when_registered():
    before = dict(LOSSES)
    own = HyperParameter('margin', 'm', 'margin', default=0.5, low=0.0)
    with pytest.raises(ValueError, match='clashes'):
        register_loss('tmp_clash', settings=(own, own), help='x.', parts=('ce',))
    with pytest.raises(ValueError, match='clashes'):
        register_loss('tmp_clash', settings=(HyperParameter('x', 'T', 'x', default=1.0),),
                      help='x.', parts=('ce',))
    with pytest.raises(ValueError, match='must be a number >= 0'):
        register_loss('tmp_clash', settings=(HyperParameter('x', 'x', 'x', default=-1.0,
                                                            low=0.0),), help='x.', parts=('ce',))
    with pytest.raises(ValueError, match='defaults to 0.25 in the function'):
        register_loss('tmp_clash', settings=(own,), help='x.', parts=('ce',))(
            lambda s, t, y, *, epoch=1, margin=0.25: None)
    assert LOSSES == before
    assert expand_grid(['dkd'], sets=parse_sets(['dkd.nckd_weight=8,4'])) == [
        ('dkd', {'temperature': 4.0}), ('dkd', {'temperature': 4.0, 'nckd_weight': 4.0})]


def test_a_resume_refusal_names_the_students_and_settings_that_changed():
    from kd.run.resume import describe_change
    kd4 = {'name': 'student_kd', 'loss': 'kd', 'params': {'temperature': 4.0, 'alpha': 0.1}}
    kd3 = dict(kd4, params={'temperature': 3.0, 'alpha': 0.1})
    base = {'name': 'student_base', 'loss': 'ce', 'params': {}}
    assert describe_change('students', [kd4, base], [kd3, base]) == \
        'student_kd (temperature: 4.0 -> 3.0)'
    b50, b60, b100 = ({'name': f'fitnet_b{b}', 'loss': 'fitnet', 'params': {'beta': float(b)}}
                      for b in (50, 60, 100))
    assert describe_change('students', [b50, b100], [b60, b100]) == \
        'fitnet_b50 -> fitnet_b60 (beta: 50.0 -> 60.0)'
    assert describe_change('students', [b50, b100], [b100]) == \
        'students no longer trained: fitnet_b50'
    dkd = {'name': 'student_kd', 'loss': 'dkd', 'params': {'temperature': 4.0}}
    assert describe_change('students', [kd4], [dkd]) == \
        "student_kd (loss: 'kd' -> 'dkd', alpha: 0.1 -> None)"
    assert describe_change('epochs', 2, 3) == 'epochs: 2 -> 3'
