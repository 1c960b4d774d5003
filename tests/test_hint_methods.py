"""NST, VID and OFD (hint_methods.py) against float64 transcriptions of their authors' code
(mdistiller's NST.py, VID.py, OFD.py) on the zoo's resnet32x4 -> resnet8x4 shapes at 100
classes; OFD's margins from a real teacher's BatchNorms; the BatchNorm each model names before
its ReLUs; the registered defaults; a training step; the refusals."""
import math
import os
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main
from kd.methods.plan import BuildContext, build_distiller, plan_features, point_shapes
from kd.methods.hints import ofd_margin
from kd.methods.registry import get_loss
from kd.models.registry import BN_BEFORE_RELU
from kd.models import (MODELS, StudentNet, TeacherNet, bn_before_relu, build_model, feature_points,
                    register_model)
from kd.recipes import get_recipe
from kd.engine.step import train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.run.teacher_form import fold_batchnorm
from kd.data.loader import Batch

# resnet32x4 (teacher) and resnet8x4 (student) at 100 classes: point_shapes at batch 1
# (checked against the models in test_ofd_margins_are_the_authors_from_a_real_teacher)
ZOO_SHAPES = {'stage1': (1, 64, 32, 32), 'stage2': (1, 128, 16, 16), 'stage3': (1, 256, 8, 8)}
ZOO_SHAPES.update({f'{k}_pre': v for k, v in list(ZOO_SHAPES.items())})
BATCH, CLASSES = 4, 100


def context(student_shapes, teacher_shapes, teacher_bn=None):
    return BuildContext(student_shapes, teacher_shapes, torch.arange(40) % CLASSES, CLASSES,
                        teacher_bn)


def random_feats(shapes, names, grad, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(BATCH, *shapes[k][1:], dtype=torch.float64, generator=g)
            .requires_grad_(grad) for k in names}


def logits_and_labels():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(BATCH, CLASSES, dtype=torch.float64, generator=g),
            torch.randint(0, CLASSES, (BATCH,), generator=g))


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def assert_close(ours, theirs, rtol=1e-10):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The authors' code (mdistiller), transcribed; the modules' forwards written with F.

def authors_pool(f_s, f_t):
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return f_s, f_t


def authors_nst_loss(g_s, g_t):
    def poly_kernel(a, b):
        a = a.unsqueeze(1)
        b = b.unsqueeze(2)
        return (a * b).sum(-1).pow(2)

    def single(f_s, f_t):
        f_s, f_t = authors_pool(f_s, f_t)
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
                - 2 * poly_kernel(f_s, f_t).mean())
    return sum(single(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


def authors_vid_loss(regressor, log_scale, f_s, f_t, eps=1e-5):
    f_s, f_t = authors_pool(f_s, f_t)
    pred_mean = regressor(f_s)
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + eps
    pred_var = pred_var.view(1, -1, 1, 1).to(pred_mean)
    neg_log_prob = 0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var))
    return torch.mean(neg_log_prob)


def authors_regressor(weights):
    """nn.Sequential(conv1x1(s, t), ReLU, conv1x1(t, t), ReLU, conv1x1(t, t)), no biases."""
    w0, w1, w2 = weights
    return lambda x: F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w0)), w1)), w2)


def authors_feat_loss(source, target, margin):
    margin = margin.to(source)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2
            * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).mean(dim=0).sum()


def authors_ofd_loss(connectors, margins, feature_student, feature_teacher):
    min_len = min(len(feature_student), len(feature_teacher))
    feature_student, feature_teacher = feature_student[-min_len:], feature_teacher[-min_len:]
    feature_student = [connectors[idx](feat) for idx, feat in enumerate(feature_student)]
    loss_distill = 0
    feat_num = len(feature_student)
    for i in range(feat_num):
        loss_distill = loss_distill + authors_feat_loss(
            feature_student[i],
            F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            margins[i]) / 2 ** (feat_num - i - 1)
    return loss_distill


def authors_connector(conv, bn):
    """Conv2d(kernel 1, no bias) then BatchNorm2d in training mode (batch statistics)."""
    return lambda x: F.batch_norm(F.conv2d(x, conv.weight), None, None, bn.weight, bn.bias,
                                  training=True, eps=bn.eps)


def authors_margins(weight, bias):
    """OFD.init_ofd_modules' margins, with statistics.NormalDist's cdf for scipy's norm.cdf."""
    cdf = NormalDist().cdf
    margin = []
    for s, m in zip(weight, bias):
        s = abs(s.item())
        m = m.item()
        if cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
                          / cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.FloatTensor(margin).unsqueeze(1).unsqueeze(2).unsqueeze(0)


def random_bn(channels, seed):
    """(weight, bias) of a BN with both signs of gamma, and betas far enough above 0 for some
    channels to fall on the -3 s side of the margin rule."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g) * 2 * weight.abs()
    bias[::5] = 4 * weight[::5].abs()  # Phi(-4) < 0.001
    return weight, bias


# ---------------------------------------------------------------------------------------------
# Against the authors' code, float64

def test_nst_equals_authors_code():
    stages = ('stage1', 'stage2', 'stage3')
    fs = random_feats(ZOO_SHAPES, stages, True, 1)
    ft = random_feats(ZOO_SHAPES, stages, False, 2)
    logits, labels = logits_and_labels()
    d = build_distiller('nst', {}, context(ZOO_SHAPES, ZOO_SHAPES))
    assert d.student_points == d.teacher_points == stages
    loss, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft)
    nst = authors_nst_loss([fs[k] for k in stages], [ft[k] for k in stages])
    expected = F.cross_entropy(logits, labels) + 50.0 * nst
    assert_close([parts['nst'], loss], [nst, expected])
    assert_close(grads(loss, list(fs.values())), grads(expected, list(fs.values())))
    assert list(d.parameters()) == []


def test_vid_equals_authors_code():
    stages = ('stage1', 'stage2', 'stage3')
    fs = random_feats(ZOO_SHAPES, stages, True, 3)
    ft = random_feats(ZOO_SHAPES, stages, False, 4)
    logits, labels = logits_and_labels()
    torch.manual_seed(0)
    d = build_distiller('vid', {}, context(ZOO_SHAPES, ZOO_SHAPES))
    # mdistiller's initial log-scale (float32): the variance starts at INIT_PRED_VAR = 5
    start = np.log(np.exp(5.0 - 1e-5) - 1.0) * torch.ones(256)
    assert torch.equal(d.log_scales[2].detach(), start)
    torch.testing.assert_close(F.softplus(d.log_scales[0].double()) + 1e-5,
                               torch.full((64,), 5.0, dtype=torch.float64))
    d = d.double()
    with torch.no_grad():  # trained values: the scales differ per channel
        for p in d.log_scales:
            p.add_(torch.randn_like(p))
    loss, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft)
    weights = [[m.weight for m in r if isinstance(m, nn.Conv2d)] for r in d.regressors]
    vid = sum(authors_vid_loss(authors_regressor(w), ls, fs[k], ft[k])
              for w, ls, k in zip(weights, d.log_scales, stages))
    expected = F.cross_entropy(logits, labels) + 1.0 * vid
    assert_close([parts['vid'], loss], [vid, expected])
    wrt = list(fs.values()) + [w for ws in weights for w in ws] + list(d.log_scales)
    assert_close(grads(loss, wrt), grads(expected, wrt))
    # the log-scales are the distiller's parameters (mdistiller's plain list never trains)
    own = {id(p) for p in d.parameters()}
    assert all(id(p) in own for p in d.log_scales)
    assert [tuple(w.shape) for w in weights[0]] == [(64, 64, 1, 1)] * 3


def test_ofd_equals_authors_code():
    pre = ('stage1_pre', 'stage2_pre', 'stage3_pre')
    fs = random_feats(ZOO_SHAPES, pre, True, 5)
    ft = random_feats(ZOO_SHAPES, pre, False, 6)
    logits, labels = logits_and_labels()
    bns = {k: random_bn(ZOO_SHAPES[k][1], i) for i, k in enumerate(pre)}
    torch.manual_seed(0)
    d = build_distiller('ofd', {}, context(ZOO_SHAPES, ZOO_SHAPES, bns)).double()
    assert d.student_points == d.teacher_points == pre
    with torch.no_grad():  # trained BN affine parameters, not (1, 0)
        for c in d.connectors:
            c[1].weight.uniform_(0.5, 1.5)
            c[1].bias.uniform_(-0.5, 0.5)
    loss, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft)
    margins = [authors_margins(*bns[k]) for k in pre]
    ofd = authors_ofd_loss([authors_connector(*c) for c in d.connectors], margins,
                           [fs[k] for k in pre], [ft[k] for k in pre])
    expected = F.cross_entropy(logits, labels) + 0.001 * ofd
    assert_close([parts['ofd'], loss], [ofd, expected])
    wrt = list(fs.values()) + [p for c in d.connectors for p in c.parameters()]
    assert_close(grads(loss, wrt), grads(expected, wrt))
    # some elements fall in each of the partial L2's three cases (else the test proves less)
    source = d.connectors[0](fs['stage1_pre'])
    target, m = ft['stage1_pre'], margins[0].double()
    for case in ((source > m) & (target <= m), (source > target) & (target > m) & (target <= 0),
                 target > 0):
        assert case.any()


@pytest.mark.parametrize('method', ['nst', 'vid', 'ofd'])
def test_the_larger_map_is_pooled_and_stages_pair_as_the_reference(method):
    """Other sizes and counts: a student of 3 stages at 16, 8, 4 pixels against a teacher of 4
    at 32, 16, 8, 4 (NST, VID: stage j with stage j, the larger map pooled; OFD: the last 3
    pre-activations, the teacher's map pooled to the student's)."""
    s_shapes = {'stage1': (1, 4, 16, 16), 'stage2': (1, 6, 8, 8), 'stage3': (1, 8, 4, 4)}
    t_shapes = {'stage1': (1, 5, 32, 32), 'stage2': (1, 7, 16, 16), 'stage3': (1, 9, 8, 8),
                'stage4': (1, 10, 4, 4)}
    for shapes in (s_shapes, t_shapes):
        shapes.update({f'{k}_pre': v for k, v in list(shapes.items())})
    pre = method == 'ofd'
    s_names = [f'stage{i}' + ('_pre' if pre else '') for i in (1, 2, 3)]
    t_names = [f'stage{i}' + ('_pre' if pre else '') for i in ((2, 3, 4) if pre else (1, 2, 3))]
    fs = random_feats(s_shapes, s_names, True, 8)
    ft = random_feats(t_shapes, t_names, False, 9)
    logits, labels = logits_and_labels()
    bns = {f'stage{i}_pre': random_bn(t_shapes[f'stage{i}'][1], i) for i in (1, 2, 3, 4)}
    torch.manual_seed(0)
    d = build_distiller(method, {}, context(s_shapes, t_shapes, bns)).double()
    assert (list(d.student_points), list(d.teacher_points)) == (s_names, t_names)
    _, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft)
    g_s, g_t = [fs[k] for k in s_names], [ft[k] for k in t_names]
    if method == 'nst':
        expected = authors_nst_loss(g_s, g_t)
    elif method == 'vid':
        weights = [[m.weight for m in r if isinstance(m, nn.Conv2d)] for r in d.regressors]
        expected = sum(authors_vid_loss(authors_regressor(w), ls, a, b)
                       for w, ls, a, b in zip(weights, d.log_scales, g_s, g_t))
    else:  # the margins of the teacher's stages 2..4, the ones paired
        expected = authors_ofd_loss([authors_connector(*c) for c in d.connectors],
                                    [authors_margins(*bns[k]) for k in t_names], g_s, g_t)
    assert_close([parts[method]], [expected])
    assert_close(grads(parts[method], g_s), grads(expected, g_s))


def test_ofd_margins_are_the_authors_from_a_real_teacher():
    torch.manual_seed(0)
    teacher, student = build_model('resnet32x4', 100).eval(), build_model('resnet8x4', 100)
    names = bn_before_relu('resnet32x4', teacher)
    modules = dict(teacher.named_modules())
    with torch.no_grad():
        for i, path in enumerate(names.values()):
            modules[path].weight.copy_(random_bn(modules[path].num_features, i)[0])
            modules[path].bias.copy_(random_bn(modules[path].num_features, i)[1])
    plan = plan_features([('resnet8x4', 'ofd', student)], teacher,
                         feature_points('resnet32x4', teacher), 'cpu', 100, 'resnet32x4')
    for shapes in (plan.teacher_shapes, plan.student_shapes['resnet8x4']):
        assert {k: tuple(v) for k, v in shapes.items() if k in ZOO_SHAPES} == ZOO_SHAPES
    d = plan.build('ofd', {}, 'resnet8x4', torch.arange(40) % 100)
    # mdistiller's get_bn_before_relu: each stage's last block's bn2
    assert list(names.values()) == ['layer1.4.bn2', 'layer2.4.bn2', 'layer3.4.bn2']
    for i, (point, path) in enumerate(names.items()):
        bn = modules[path]
        expected = authors_margins(bn.weight, bn.bias)
        torch.testing.assert_close(getattr(d, f'margin{i}'), expected, rtol=1e-6, atol=1e-7)
        assert (expected.flatten()[::5] == -3 * bn.weight[::5].abs()).all()  # both branches
        assert (expected.flatten()[1::5] > -3 * bn.weight[1::5].abs()).any()
    # buffers: saved in the resume state, and moved with the module
    assert {'margin0', 'margin1', 'margin2'} <= set(d.state_dict())
    assert not any(n.startswith('margin') for n, _ in d.named_parameters())


def test_ofd_margin_of_a_zero_scale_is_the_limit_of_the_authors():
    """The reference divides by |gamma|; a BN of scale 0 (TeacherNet's bn2 at initialisation)
    gets the limit as |gamma| -> 0, min(beta, 0)."""
    bias = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.equal(ofd_margin(torch.zeros(3), bias), torch.tensor([-1.0, 0.0, 0.0]))
    torch.testing.assert_close(authors_margins(torch.full((3,), 1e-6), bias).flatten(),
                               torch.tensor([-1.0, 0.0, 0.0]), rtol=0, atol=1e-5)


def test_ofd_connectors_follow_the_reference_init():
    torch.manual_seed(0)
    d = build_distiller('ofd', {}, context(
        ZOO_SHAPES, ZOO_SHAPES, {k: random_bn(ZOO_SHAPES[k][1], 0) for k in ZOO_SHAPES
                                 if k.endswith('_pre')}))
    conv, bn = d.connectors[2]
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.weight.shape[:2] == (256, 256)
    # normal(0, sqrt(2 / (k * k * out_channels)))
    assert abs(conv.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.02
    assert abs(conv.weight.mean().item()) < 0.005
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))


def test_registered_defaults_and_parts():
    for name, beta in (('nst', 50.0), ('vid', 1.0), ('ofd', 0.001)):
        spec = get_loss(name)
        assert dict(spec.defaults) == {'beta': beta}
        assert spec.parts == ('ce', name) and spec.uses_teacher and spec.distiller is not None
        assert spec.help.endswith('.') and '--beta' in spec.help
        assert f'({beta:g})' in spec.help


# ---------------------------------------------------------------------------------------------
# The BatchNorms before the ReLUs

@pytest.mark.parametrize('arch', sorted(MODELS))
def test_every_named_batchnorm_exists_with_its_points_channels(arch):
    model = build_model(arch, 100)
    names = bn_before_relu(arch, model)
    shapes = point_shapes(model, feature_points(arch, model), 'cpu')
    pre = sorted(k for k in shapes if k.endswith('_pre'))
    # every family names one per pre-activation point, but ShuffleNet V2 (half of each
    # pre-activation's channels come from no BatchNorm)
    assert sorted(names) == ([] if arch == 'shufflev2' else pre)
    modules = dict(model.named_modules())
    for point, path in names.items():
        assert isinstance(modules[path], nn.BatchNorm2d)
        assert modules[path].num_features == shapes[point][1]


def test_a_registered_model_names_its_batchnorms_by_module_path():
    @register_model('bn_test_net', bn_before_relu={'stage1_pre': '1'})
    def net(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    try:
        assert bn_before_relu('bn_test_net', build_model('bn_test_net')) == {'stage1_pre': '1'}
    finally:
        MODELS.pop('bn_test_net')
        BN_BEFORE_RELU.pop('bn_test_net')
    assert bn_before_relu(None, nn.Linear(2, 2)) == {}  # neither registered nor a method


# ---------------------------------------------------------------------------------------------
# Training, refusals

@pytest.mark.parametrize('method', ['vid', 'ofd'])
def test_vid_and_ofd_train_their_modules_with_the_student_and_keep_them_out_of_the_checkpoint(
        method):
    torch.manual_seed(0)
    recipe = get_recipe('standard')
    teacher, student = TeacherNet().eval(), StudentNet(widths=(8, 16, 16, 32))
    with torch.no_grad():  # a trained teacher's BN scales (TeacherNet zero-initialises bn2's)
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
    labels = torch.arange(32) % 10
    plan = plan_features([('cnn', method, student)], teacher, feature_points('resnet18', teacher),
                         'cpu', 10)
    d = plan.build(method, {}, 'cnn', labels)
    t = Trainee(method, student, method, recipe, torch.device('cpu'),
                options=TraineeOptions(distiller=d, points=plan.student_points['cnn']))
    held = {id(p) for g in t.optimizer.param_groups for p in g['params']}
    assert all(id(p) in held for p in d.parameters())
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    idx = torch.arange(8)
    out = train_step([t], fold_batchnorm(teacher, plan.teacher_points), torch.randn(8, 3, 32, 32),
                     labels[idx], recipe, batch=Batch(None, None, idx, 0, 0, 0, idx, 0))
    assert set(out[0].parts) == {'ce', method} and math.isfinite(out[0].loss.item())
    trained = 'log_scales.0' if method == 'vid' else 'connectors.0.0.weight'
    assert not torch.equal(dict(d.named_parameters())[trained], before[trained])
    assert set(t.module.state_dict()) == set(StudentNet(widths=(8, 16, 16, 32)).state_dict())
    if method == 'ofd':  # the last 3 of resnet18's 4 pre-activations, with their BNs' margins
        assert d.teacher_points == ('stage2_pre', 'stage3_pre', 'stage4_pre')
        bn = teacher.layer2[1].bn2
        torch.testing.assert_close(d.margin0, authors_margins(bn.weight, bn.bias))


def test_ofd_refuses_a_teacher_without_its_batchnorms():
    shapes = ZOO_SHAPES
    with pytest.raises(ValueError, match=r'no BatchNorm before the ReLU.*bn_before_relu'):
        build_distiller('ofd', {}, context(shapes, shapes))
    partial = {'stage3_pre': random_bn(256, 0)}
    with pytest.raises(ValueError, match='stage1_pre, stage2_pre'):
        build_distiller('ofd', {}, context(shapes, shapes, partial))
    # when the run is planned, before any training: shufflev2 names none
    teacher, student = build_model('shufflev2', 10).eval(), StudentNet(widths=(8, 16, 16, 32))
    with pytest.raises(ValueError, match='OFD: the teacher names no BatchNorm'):
        plan_features([('cnn', 'ofd', student)], teacher, feature_points('shufflev2', teacher),
                      'cpu', 10)
    # the other methods do not need them
    plan = plan_features([('cnn', 'vid', student)], teacher,
                         feature_points('shufflev2', teacher), 'cpu', 10)
    assert plan.teacher_bn is None


@pytest.mark.parametrize('method', ['nst', 'vid', 'ofd'])
def test_a_model_without_the_points_read_is_refused(method):
    pooled_only = {'pooled': (1, 8)}
    with pytest.raises(ValueError, match=f'{method.upper()}: the student .*names no'):
        build_distiller(method, {}, context(pooled_only, ZOO_SHAPES))
    if method == 'ofd':  # stages without pre-activation points
        stages = {k: v for k, v in ZOO_SHAPES.items() if not k.endswith('_pre')}
        with pytest.raises(ValueError, match="OFD: the teacher names no pre-activation"):
            build_distiller('ofd', {}, context(ZOO_SHAPES, stages))


@pytest.mark.slow
def test_nst_vid_ofd_train_from_the_command_line(trained_run, tmp_path):
    """The runner's path: the plan names the teacher's BatchNorms, the margins are saved in
    the resume state, the best students are the plain model."""
    out = tmp_path / 'out'
    code = main.main(['--loss', 'nst', 'vid', 'ofd', '--epochs', '1', '--subset', '100',
                      '--batch-size', '32', '--device', 'cpu', '--no-amp',
                      '--data-dir', trained_run['common'][1], '--out-dir', str(out),
                      '--teacher-checkpoint',
                      os.path.join(trained_run['out'], 'best_teacher.pth')])
    assert code == 0
    names = ['nst_b50', 'vid_b1', 'ofd_b0.001']
    for name in names:
        StudentNet().load_state_dict(torch.load(out / f'best_{name}.pth', weights_only=True))
        header = open(out / f'log_{name}.csv').readline().strip().split(',')
        assert f"train_{name.split('_')[0]}" in header
    state = torch.load(out / 'last_students.pt', weights_only=True)['distillers']
    assert set(state) == set(names)
    assert {'margin0', 'margin1', 'margin2'} <= set(state['ofd_b0.001'])
    assert {'log_scales.0', 'log_scales.2'} <= set(state['vid_b1'])
