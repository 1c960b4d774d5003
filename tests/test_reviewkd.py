"""ReviewKD (reviewkd.py) against a float64 transcription of its authors' code (mdistiller
distillers/ReviewKD.py: ABF, hcl_loss, ReviewKD.forward_train), computed with our distiller's
own ABF parameters; its configuration for resnet32x4 -> resnet8x4 against mdistiller's
(engine/cfg.py CFG.REVIEWKD), its warm-up, pairs of different depths, and a training step."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.methods.plan import BuildContext, build_distiller, point_shapes
from kd.methods.registry import get_loss
from kd.models import StudentNet, TeacherNet, build_model, feature_points
from kd.recipes import get_recipe
from kd.methods.reviewkd import hcl_loss
from kd.engine.step import train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.run.teacher_form import fold_batchnorm

# Shapes of the zoo at batch 1 (distillers.point_shapes of build_model(arch, 100)), written out
RESNET32X4 = {'stem': (1, 32, 32, 32), 'stage1': (1, 64, 32, 32), 'stage1_pre': (1, 64, 32, 32),
              'stage2': (1, 128, 16, 16), 'stage2_pre': (1, 128, 16, 16),
              'stage3': (1, 256, 8, 8), 'stage3_pre': (1, 256, 8, 8), 'pooled': (1, 256)}
RESNET8X4 = dict(RESNET32X4)  # the same stages, one block each instead of five
VGG13 = {'stem': (1, 64, 32, 32), 'stage1': (1, 128, 16, 16), 'stage1_pre': (1, 128, 16, 16),
         'stage2': (1, 256, 8, 8), 'stage2_pre': (1, 256, 8, 8), 'stage3': (1, 512, 4, 4),
         'stage3_pre': (1, 512, 4, 4), 'stage4': (1, 512, 4, 4), 'stage4_pre': (1, 512, 4, 4),
         'pooled': (1, 512)}
RESNET50 = {'stem': (1, 64, 32, 32), 'stage1': (1, 256, 32, 32), 'stage1_pre': (1, 256, 32, 32),
            'stage2': (1, 512, 16, 16), 'stage2_pre': (1, 512, 16, 16),
            'stage3': (1, 1024, 8, 8), 'stage3_pre': (1, 1024, 8, 8),
            'stage4': (1, 2048, 4, 4), 'stage4_pre': (1, 2048, 4, 4), 'pooled': (1, 2048)}


def context(student_shapes, teacher_shapes, n=40, classes=100):
    return BuildContext({k: torch.Size(v) for k, v in student_shapes.items()},
                        {k: torch.Size(v) for k, v in teacher_shapes.items()},
                        torch.arange(n) % classes, classes)


def random_feats(shapes, batch, gen, grad=False):
    return {k: torch.randn(batch, *v[1:], dtype=torch.float64, generator=gen, requires_grad=grad)
            for k, v in shapes.items()}


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# ---------------------------------------------------------------------------------------------
# The authors' code (mdistiller distillers/ReviewKD.py), transcribed over given parameters: an
# ABF is a dict of our ABF module's tensors; nn.Sequential(conv, BatchNorm2d) in training mode
# is F.conv2d then F.batch_norm on the batch's statistics.

def authors_abf(p, x, y=None, shape=None, out_shape=None):
    def bn(x, m):
        return F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)
    n, _, h, w = x.shape
    x = bn(F.conv2d(x, p.conv1.weight), p.bn1)
    if p.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = torch.cat([x, y], dim=1)
        z = torch.sigmoid(F.conv2d(z, p.att_conv.weight, p.att_conv.bias))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    y = bn(F.conv2d(x, p.conv2.weight, stride=1, padding=1), p.bn2)
    return y, x


def authors_hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def authors_forward_train(abfs, shapes, out_shapes, logits_student, features_student,
                          features_teacher, target, epoch, reviewkd_loss_weight=5.0,
                          warmup_epochs=20, ce_loss_weight=1.0):
    """ReviewKD.forward_train after the two networks' forwards (STU_PREACT False); abfs in the
    reference's order (reversed: the pooled level first)."""
    x = features_student["feats"] + [
        features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
    ]
    x = x[::-1]
    results = []
    out_features, res_features = authors_abf(abfs[0], x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = authors_abf(abf, features, res_features, shape, out_shape)
        results.insert(0, out_features)
    features_teacher = features_teacher["preact_feats"][1:] + [
        features_teacher["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
    ]
    loss_ce = ce_loss_weight * F.cross_entropy(logits_student, target)
    loss_reviewkd = (reviewkd_loss_weight * min(epoch / warmup_epochs, 1.0)
                     * authors_hcl_loss(results, features_teacher))
    return loss_ce, loss_reviewkd


# mdistiller engine/cfg.py CFG.REVIEWKD: the configuration of resnet32x4 -> resnet8x4
MDISTILLER_SHAPES = [1, 8, 16, 32]
MDISTILLER_OUT_SHAPES = [1, 8, 16, 32]
MDISTILLER_IN_CHANNELS = [64, 128, 256, 256]
MDISTILLER_OUT_CHANNELS = [64, 128, 256, 256]


def test_the_shapes_written_here_are_the_zoos():
    for arch, shapes in (('resnet32x4', RESNET32X4), ('resnet8x4', RESNET8X4)):
        model = build_model(arch, 100)
        got = point_shapes(model, feature_points(arch, model), 'cpu')
        assert {k: tuple(v) for k, v in got.items()} == shapes


def test_the_config_of_resnet32x4_to_resnet8x4_is_mdistillers():
    d = build_distiller('reviewkd', {}, context(RESNET8X4, RESNET32X4))
    assert d.student_points == ('stage1', 'stage2', 'stage3', 'pooled')
    assert d.teacher_points == ('stage1_pre', 'stage2_pre', 'stage3_pre', 'pooled')
    assert d.in_channels == MDISTILLER_IN_CHANNELS
    assert d.out_channels == MDISTILLER_OUT_CHANNELS
    assert d.shapes == [(s, s) for s in MDISTILLER_SHAPES]
    assert d.out_shapes == [(s, s) for s in MDISTILLER_OUT_SHAPES]
    assert d.mid_channels == 256  # min(512, in_channels[-1])
    # the reference's reversed list: (in, out) of each ABF, only the first without fusion
    assert [(a.conv1.in_channels, a.conv1.out_channels, a.conv2.out_channels) for a in d.abfs] \
        == [(256, 256, 256), (256, 256, 256), (128, 256, 128), (64, 256, 64)]
    assert [a.att_conv is None for a in d.abfs] == [True, False, False, False]
    assert all(a.att_conv.in_channels == 512 and a.att_conv.out_channels == 2
               for a in d.abfs[1:])
    spec = get_loss('reviewkd')
    assert dict(spec.defaults) == {'beta': 5.0} and spec.warmup_epochs == 20
    assert spec.parts == ('ce', 'reviewkd') and spec.help.endswith('.')


def test_reviewkd_equals_authors_code():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d = build_distiller('reviewkd', {}, context(RESNET8X4, RESNET32X4)).double()
    for m in d.modules():  # non-trivial affine BatchNorms and attention biases
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    b = 4
    fs = random_feats(RESNET8X4, b, gen, grad=True)
    ft = random_feats(RESNET32X4, b, gen)
    logits = torch.randn(b, 100, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 100, (b,), generator=gen)
    epoch = 7
    loss, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft, epoch=epoch)
    # the reference's feats include the stem, which its zip drops
    student = {'feats': [fs['stem']] + [fs[f'stage{i}'] for i in (1, 2, 3)],
               'pooled_feat': fs['pooled']}
    teacher = {'preact_feats': [ft['stem']] + [ft[f'stage{i}_pre'] for i in (1, 2, 3)],
               'pooled_feat': ft['pooled']}
    ce, review = authors_forward_train(list(d.abfs), MDISTILLER_SHAPES, MDISTILLER_OUT_SHAPES,
                                       logits, student, teacher, labels, epoch)
    expected = ce + review
    assert set(parts) == {'ce', 'reviewkd'}
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    assert torch.allclose(parts['ce'], ce, rtol=1e-12, atol=0)
    # the part carries neither beta nor the warm-up
    assert torch.allclose(parts['reviewkd'] * 5.0 * epoch / 20, review, rtol=1e-12, atol=0)
    inputs = [fs[k] for k in ('stage1', 'stage2', 'stage3', 'pooled')] + [logits]
    params = list(d.parameters())
    ours, theirs = grads(loss, inputs + params), grads(expected, inputs + params)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # every ABF parameter and every student level takes part; the stem is not read
    assert all(g.abs().sum() > 0 for g in ours)
    assert 'stem' not in d.student_points


def test_the_hierarchical_context_loss_weights_its_pyramid():
    gen = torch.Generator().manual_seed(1)
    fs, ft = (torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen) for _ in range(2))

    def pooled(k):
        return F.mse_loss(F.adaptive_avg_pool2d(fs, k), F.adaptive_avg_pool2d(ft, k))
    # 8 x 8: sizes 4, 2, 1 with weights 1/2, 1/4, 1/8; 2 x 2: size 1 only, weight 1/2
    eight = (F.mse_loss(fs, ft) + pooled(4) / 2 + pooled(2) / 4 + pooled(1) / 8) / 1.875
    small_s, small_t = fs[:, :, :2, :2], ft[:, :, :2, :2]
    two = (F.mse_loss(small_s, small_t) + F.mse_loss(small_s.mean((2, 3)),
                                                     small_t.mean((2, 3))) / 2) / 1.5
    assert torch.allclose(hcl_loss([fs], [ft]), eight, rtol=1e-13)
    assert torch.allclose(hcl_loss([fs, small_s], [ft, small_t]), eight + two, rtol=1e-13)
    one = fs[:, :, :1, :1]  # 1 x 1: the plain MSE
    assert torch.allclose(hcl_loss([one], [ft[:, :, :1, :1]]), F.mse_loss(one, ft[:, :, :1, :1]))


@pytest.mark.parametrize('epoch,factor', [(1, 0.05), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_the_review_term_warms_up_over_20_epochs(epoch, factor):
    gen = torch.Generator().manual_seed(2)
    s = {'stage1': (1, 4, 8, 8), 'stage2': (1, 6, 4, 4), 'pooled': (1, 6)}
    t = {'stage1_pre': (1, 5, 8, 8), 'stage1': (1, 5, 8, 8), 'stage2_pre': (1, 7, 4, 4),
         'stage2': (1, 7, 4, 4), 'pooled': (1, 7)}
    d = build_distiller('reviewkd', {}, context(s, t, classes=5)).double()
    logits = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 1, 2])
    loss, parts = d(logits, None, labels, student_feats=random_feats(s, 3, gen),
                    teacher_feats=random_feats(t, 3, gen), epoch=epoch)
    assert parts['reviewkd'] > 0
    assert torch.allclose(loss, parts['ce'] + 5.0 * factor * parts['reviewkd'], rtol=1e-13)


@pytest.mark.parametrize('student,teacher,pairs', [
    (RESNET8X4, VGG13, [('stage1', 'stage2_pre'), ('stage2', 'stage3_pre'),
                        ('stage3', 'stage4_pre')]),
    (RESNET8X4, RESNET50, [('stage1', 'stage2_pre'), ('stage2', 'stage3_pre'),
                           ('stage3', 'stage4_pre')]),
    (VGG13, RESNET32X4, [('stage2', 'stage1_pre'), ('stage3', 'stage2_pre'),
                         ('stage4', 'stage3_pre')]),
])
def test_different_depths_pair_the_deepest_stages(student, teacher, pairs):
    gen = torch.Generator().manual_seed(3)
    d = build_distiller('reviewkd', {}, context(student, teacher))
    assert list(zip(d.student_points, d.teacher_points)) == pairs + [('pooled', 'pooled')]
    assert d.mid_channels == min(512, student['pooled'][1])
    fs = {k: v.float() for k, v in random_feats(student, 2, gen, grad=False).items()}
    for v in fs.values():
        v.requires_grad_(True)
    ft = {k: v.float() for k, v in random_feats(teacher, 2, gen).items()}
    outs = d.review(fs)
    assert [tuple(o.shape[1:]) for o in outs] == [tuple(ft[p].shape[1:]) if ft[p].dim() == 4
                                                   else (ft[p].shape[1], 1, 1)
                                                   for p in d.teacher_points]
    loss, parts = d(torch.randn(2, 100, generator=gen), None, torch.tensor([3, 4]),
                    student_feats=fs, teacher_feats=ft, epoch=20)
    assert math.isfinite(loss.item()) and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(fs[k].grad is not None for k in d.student_points)


def test_a_model_without_stages_or_pre_activations_is_refused():
    with pytest.raises(ValueError, match='no stages'):
        build_distiller('reviewkd', {}, context({'pooled': (1, 8)}, RESNET32X4))
    no_pre = {k: v for k, v in RESNET32X4.items() if not k.endswith('_pre')}
    with pytest.raises(ValueError, match='stage1_pre'):
        build_distiller('reviewkd', {}, context(RESNET8X4, no_pre))


def test_reviewkd_trains_its_abfs_with_the_student_and_keeps_them_out_of_the_checkpoint():
    torch.manual_seed(0)
    recipe = get_recipe('standard')
    teacher, student = TeacherNet().eval(), StudentNet(widths=(8, 16, 16, 32))
    tp, sp = feature_points('resnet18', teacher), feature_points('cnn', student)
    ctx = BuildContext(point_shapes(student, sp, 'cpu'), point_shapes(teacher, tp, 'cpu'),
                       torch.arange(32) % 10, 10)
    d = build_distiller('reviewkd', {}, ctx)
    # 3 student stages against 4 teacher stages: the deepest three are paired
    assert d.teacher_points == ('stage2_pre', 'stage3_pre', 'stage4_pre', 'pooled')
    t = Trainee('reviewkd', student, 'reviewkd', recipe, torch.device('cpu'),
                options=TraineeOptions(distiller=d, points=sp))
    held = {id(p) for g in t.optimizer.param_groups for p in g['params']}
    assert all(id(p) in held for p in d.parameters())
    before = {k: v.detach().clone() for k, v in d.named_parameters()}
    out = train_step([t], fold_batchnorm(teacher, {k: tp[k] for k in d.teacher_points}),
                     torch.randn(8, 3, 32, 32), ctx.train_labels[:8], recipe, epoch=20)
    assert set(out[0].parts) == {'ce', 'reviewkd'} and math.isfinite(out[0].loss.item())
    assert torch.allclose(out[0].loss, out[0].parts['ce'] + 5.0 * out[0].parts['reviewkd'])
    changed = [k for k, v in d.named_parameters() if not torch.equal(v, before[k])]
    assert {k.split('.')[2] for k in changed} >= {'conv1', 'conv2', 'att_conv'}
    assert set(t.module.state_dict()) == set(StudentNet(widths=(8, 16, 16, 32)).state_dict())
