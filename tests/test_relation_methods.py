"""Relation methods (relation_methods.py): sp, rkd, pkt and kdsvd against transcriptions of their
authors' code in float64 (values and gradients), their registered defaults, what their
hyper-parameters weight, the points they refuse, and a training step of each."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd.methods.plan import BuildContext, build_distiller, point_shapes
from kd.methods.registry import get_loss
from kd.models import StudentNet, feature_points
from kd.recipes import get_recipe
from kd.engine.step import train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.run.teacher_form import fold_batchnorm
from kd.data.loader import Batch

# resnet32x4 (teacher) and resnet8x4 (student) on 100 classes have the same points' shapes
# (distillers.point_shapes of build_model(arch, 100)), at batch 1
ZOO_SHAPES = {'stage1': (1, 64, 32, 32), 'stage2': (1, 128, 16, 16), 'stage3': (1, 256, 8, 8),
              'pooled': (1, 256)}
CLASSES = 100
B = 6


# ---------------------------------------------------------------------------------------------
# The authors' functions as published: mdistiller distillers/SP.py (similarity_loss), RKD.py
# (_pdist, rkd_loss), PKT.py (pkt_loss, the authors' cosine_similarity_loss) and RepDistiller
# distiller_zoo/KDSVD.py (forward, svd, removenan, align_rsv)

def authors_similarity_loss(f_s, f_t):
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = torch.mm(f_s, torch.t(f_s))
    G_s = torch.nn.functional.normalize(G_s)
    G_t = torch.mm(f_t, torch.t(f_t))
    G_t = torch.nn.functional.normalize(G_t)
    G_diff = G_t - G_s
    loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
    return loss


def authors_pdist(e, squared, eps):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def authors_rkd_loss(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    stu = f_s.view(f_s.shape[0], -1)
    tea = f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = authors_pdist(tea, squared, eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = authors_pdist(stu, squared, eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = tea.unsqueeze(0) - tea.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = stu.unsqueeze(0) - stu.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    loss = distance_weight * loss_d + angle_weight * loss_a
    return loss


def authors_pkt_loss(f_s, f_t, eps=1e-7):
    output_net_norm = torch.sqrt(torch.sum(f_s**2, dim=1, keepdim=True))
    f_s = f_s / (output_net_norm + eps)
    f_s[f_s != f_s] = 0
    target_net_norm = torch.sqrt(torch.sum(f_t**2, dim=1, keepdim=True))
    f_t = f_t / (target_net_norm + eps)
    f_t[f_t != f_t] = 0
    model_similarity = torch.mm(f_s, f_s.transpose(0, 1))
    target_similarity = torch.mm(f_t, f_t.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    loss = torch.mean(target_similarity
                      * torch.log((target_similarity + eps) / (model_similarity + eps)))
    return loss


def authors_removenan(x):
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x


def authors_svd(feat, n=1):
    size = feat.shape
    assert len(size) == 4
    x = feat.view(-1, size[1], size[2] * size[2]).transpose(-2, -1)
    u, s, v = torch.svd(x)
    u = authors_removenan(u)
    s = authors_removenan(s)
    v = authors_removenan(v)
    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)
    return u, s, v


def authors_align_rsv(a, b):
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)),
                       torch.sign(cosine), torch.zeros_like(cosine))
    a = torch.matmul(a, mask)
    return a, b


def authors_kdsvd(g_s, g_t, k=1):
    v_sb = None
    v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = authors_svd(f_t, k)
        u_s, s_s, v_s = authors_svd(f_s, k + 3)
        v_s, v_t = authors_align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            losses.append(l2loss.sum())
        v_tb = v_t
        v_sb = v_s
    bsz = g_s[0].shape[0]
    losses = [l / bsz for l in losses]
    return losses


# ---------------------------------------------------------------------------------------------
# Helpers

def zoo_inputs(seed=0, b=B):
    """Float64 logits, labels and features of a batch at the zoo's shapes; the stages are
    non-negative, as post-activation features are, and the student's require grad."""
    g = torch.Generator().manual_seed(seed)

    def feats(grad):
        out = {}
        for k, shape in ZOO_SHAPES.items():
            x = torch.randn(b, *shape[1:], generator=g, dtype=torch.float64)
            out[k] = (x.abs() if k.startswith('stage') else x).requires_grad_(grad)
        return out
    logits = torch.randn(b, CLASSES, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, CLASSES, (b,), generator=g)
    return logits, labels, feats(True), feats(False)


def build(name, params=None, student_shapes=ZOO_SHAPES, teacher_shapes=ZOO_SHAPES):
    ctx = BuildContext(student_shapes, teacher_shapes, torch.arange(40) % CLASSES, CLASSES)
    return build_distiller(name, params or {}, ctx)


def run(d, logits, labels, fs, ft):
    return d(logits, None, labels, student_feats=fs, teacher_feats=ft)


def assert_same(ours, theirs, wrt, rtol=1e-10):
    """Equal values and equal gradients wrt the tensors `wrt`."""
    assert torch.allclose(ours, theirs, rtol=rtol, atol=0), (ours.item(), theirs.item())
    got = torch.autograd.grad(ours, wrt, retain_graph=True)
    want = torch.autograd.grad(theirs, wrt, retain_graph=True)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=rtol, atol=1e-14 * e.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Against the authors' code (float64, resnet32x4 -> resnet8x4 shapes)

def test_sp_equals_authors_code_on_the_last_stage():
    logits, labels, fs, ft = zoo_inputs(0)
    d = build('sp')
    assert d.student_points == ('stage3',) and d.teacher_points == ('stage3',)  # feats[-1]
    loss, parts = run(d, logits, labels, fs, ft)
    sp = authors_similarity_loss(fs['stage3'], ft['stage3']).squeeze()
    expected = F.cross_entropy(logits, labels) + 3000.0 * sp
    assert set(parts) == {'ce', 'sp'} and parts['sp'].dtype == torch.float64
    assert_same(parts['sp'], sp, [fs['stage3']])
    assert_same(loss, expected, [fs['stage3'], logits])


def test_rkd_equals_authors_code_term_by_term():
    logits, labels, fs, ft = zoo_inputs(1)
    d = build('rkd')
    loss, parts = run(d, logits, labels, fs, ft)
    x, y = fs['pooled'], ft['pooled']
    distance = authors_rkd_loss(x, y, distance_weight=1, angle_weight=0)
    angle = authors_rkd_loss(x, y, distance_weight=0, angle_weight=1)
    expected = F.cross_entropy(logits, labels) + authors_rkd_loss(x, y)  # its 25 and 50
    assert set(parts) == {'ce', 'rkd_distance', 'rkd_angle'}
    assert_same(parts['rkd_distance'], distance, [x])
    assert_same(parts['rkd_angle'], angle, [x])
    assert_same(loss, expected, [x, logits])


def test_pkt_equals_authors_code():
    logits, labels, fs, ft = zoo_inputs(2)
    d = build('pkt')
    loss, parts = run(d, logits, labels, fs, ft)
    x, y = fs['pooled'], ft['pooled']
    pkt = authors_pkt_loss(x, y)
    assert set(parts) == {'ce', 'pkt'}
    assert_same(parts['pkt'], pkt, [x])
    assert_same(loss, F.cross_entropy(logits, labels) + 30000.0 * pkt, [x, logits])


def test_pkt_reads_non_finite_features_as_the_authors_do():
    torch.manual_seed(3)
    x = torch.randn(5, 12, dtype=torch.float64)
    x[2, 4] = float('nan')  # row 2 normalises to NaN everywhere: the authors zero it
    y = torch.randn(5, 9, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    d = build('pkt', student_shapes={'pooled': (1, 12)}, teacher_shapes={'pooled': (1, 9)})
    _, parts = run(d, torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long),
                   {'pooled': xs}, {'pooled': y})
    expected = authors_pkt_loss(xs, y)
    assert math.isfinite(parts['pkt'].item())
    assert torch.allclose(parts['pkt'], expected, rtol=1e-12)
    mine, = torch.autograd.grad(parts['pkt'], xs, retain_graph=True)
    theirs, = torch.autograd.grad(expected, xs)
    assert torch.allclose(mine, theirs, rtol=1e-10, equal_nan=True)
    assert torch.isfinite(mine[[0, 1, 3, 4]]).all()  # the other rows still learn


def test_kdsvd_equals_authors_code_over_the_zipped_stages():
    """The loss depends on the signs LAPACK gives the teacher's singular vectors (the student's
    are aligned to them; flipping a teacher's vector changes its RBF with the next stage), so
    the authors' transcription runs on the same inputs in this process: torch.svd is
    torch.linalg.svd underneath, the same routine, the same signs."""
    logits, labels, fs, ft = zoo_inputs(4)
    d = build('kdsvd')
    stages = ('stage1', 'stage2', 'stage3')
    assert d.student_points == stages and d.teacher_points == stages
    loss, parts = run(d, logits, labels, fs, ft)
    losses = authors_kdsvd([fs[k] for k in stages], [ft[k] for k in stages], k=1)
    assert len(losses) == 2  # consecutive pairs of three stages
    kdsvd = sum(losses)
    assert set(parts) == {'ce', 'kdsvd'} and parts['kdsvd'] > 0
    wrt = [fs[k] for k in stages]
    assert_same(parts['kdsvd'], kdsvd, wrt)
    assert_same(loss, F.cross_entropy(logits, labels) + kdsvd, wrt + [logits])
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(parts['kdsvd'], wrt))


def test_kdsvd_zips_stages_in_order_and_truncates():
    s_shapes = {'stage1': (1, 4, 8, 8), 'stage2': (1, 6, 4, 4)}
    t_shapes = {'stage1': (1, 4, 16, 16), 'stage2': (1, 6, 8, 8), 'stage3': (1, 6, 4, 4)}
    d = build('kdsvd', student_shapes=s_shapes, teacher_shapes=t_shapes)
    assert d.student_points == ('stage1', 'stage2') and d.teacher_points == ('stage1', 'stage2')
    torch.manual_seed(5)
    fs = [torch.randn(3, *s[1:], dtype=torch.float64, requires_grad=True)
          for s in s_shapes.values()]
    ft = [torch.randn(3, *t_shapes[k][1:], dtype=torch.float64) for k in ('stage1', 'stage2')]
    _, parts = run(d, torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                   dict(zip(s_shapes, fs)), dict(zip(s_shapes, ft)))
    assert_same(parts['kdsvd'], sum(authors_kdsvd(fs, ft)), fs)


# ---------------------------------------------------------------------------------------------
# Registry and hyper-parameters

def test_registered_defaults_and_parts():
    expected = {'sp': ({'beta': 3000.0}, ('ce', 'sp')),
                'rkd': ({'beta': 25.0, 'gamma': 50.0}, ('ce', 'rkd_distance', 'rkd_angle')),
                'pkt': ({'beta': 30000.0}, ('ce', 'pkt')),
                'kdsvd': ({'beta': 1.0}, ('ce', 'kdsvd'))}
    for name, (defaults, parts) in expected.items():
        spec = get_loss(name)
        assert dict(spec.defaults) == defaults and spec.parts == parts, name
        assert spec.uses_teacher and spec.warmup_epochs == 0 and spec.help.endswith('.')
        assert '--beta' in spec.help and ('--gamma' in spec.help) == (name == 'rkd')
        assert not list(build(name).parameters())  # nothing of their own to train


@pytest.mark.parametrize('name,params', [('sp', {'beta': 7.0}), ('pkt', {'beta': 0.5}),
                                         ('kdsvd', {'beta': 3.0}),
                                         ('rkd', {'beta': 2.0, 'gamma': 0.25})])
def test_the_hyper_parameters_weight_their_terms(name, params):
    logits, labels, fs, ft = zoo_inputs(6, b=4)
    loss, parts = run(build(name, params), logits, labels, fs, ft)
    terms = [p for p in get_loss(name).parts if p != 'ce']
    weights = [params['beta'], params['gamma']] if name == 'rkd' else [params['beta']]
    expected = parts['ce'] + sum(w * parts[t] for w, t in zip(weights, terms))
    assert torch.allclose(loss, expected, rtol=1e-13)
    assert torch.equal(parts['ce'], F.cross_entropy(logits, labels))


@pytest.mark.parametrize('params,present', [({'beta': 0.0}, 'rkd_angle'),
                                            ({'gamma': 0.0}, 'rkd_distance')])
def test_rkd_without_one_weight_has_only_the_other_term(params, present):
    logits, labels, fs, ft = zoo_inputs(7, b=4)
    loss, parts = run(build('rkd', params), logits, labels, fs, ft)
    assert parts[present] > 0
    assert torch.equal(loss, parts['ce'] + get_loss('rkd').defaults[
        'gamma' if present == 'rkd_angle' else 'beta'] * parts[present])
    x = fs['pooled']
    weights = {'rkd_distance': (1, 0), 'rkd_angle': (0, 1)}[present]
    only = F.cross_entropy(logits, labels) + (50.0 if present == 'rkd_angle' else 25.0) * \
        authors_rkd_loss(x, ft['pooled'], distance_weight=weights[0], angle_weight=weights[1])
    assert_same(loss, only, [x])


# ---------------------------------------------------------------------------------------------
# Points

@pytest.mark.parametrize('name,student,teacher,message', [
    ('sp', {'pooled': (1, 8)}, ZOO_SHAPES, 'student names no stages'),
    ('sp', ZOO_SHAPES, {'pooled': (1, 8)}, 'teacher names no stages'),
    ('rkd', {'stage1': (1, 4, 8, 8)}, ZOO_SHAPES, "student has no pooled features"),
    ('pkt', ZOO_SHAPES, {'stage1': (1, 4, 8, 8)}, "teacher has no pooled features"),
    ('kdsvd', {'stage1': (1, 64, 32, 32), 'pooled': (1, 64)}, ZOO_SHAPES, 'two stages or more'),
    ('kdsvd', {'stage1': (1, 64, 32, 32), 'stage2': (1, 96, 16, 16)}, ZOO_SHAPES,
     'stage2 has 96 channels in the student and 128 in the teacher'),
])
def test_a_model_lacking_the_point_is_refused(name, student, teacher, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name).distiller.points(student, teacher)
    with pytest.raises(ValueError, match=message):
        build(name, student_shapes=student, teacher_shapes=teacher)


# ---------------------------------------------------------------------------------------------
# Training

@pytest.mark.parametrize('name', ['sp', 'rkd', 'pkt', 'kdsvd'])
def test_a_step_trains_the_student_through_the_relation_term(name):
    """train_step with the method: the student's parameters are the optimizer's and change, the
    checkpoint is the plain student's, and the relation term reaches the student (the same step
    with its weights at 0 ends elsewhere)."""
    recipe = get_recipe('standard')
    widths = (8, 16, 16, 32)
    torch.manual_seed(0)
    teacher = StudentNet(widths=widths).eval()  # its stages' channels pair with the student's
    sp = feature_points('cnn', StudentNet(widths=widths))
    tp = feature_points('cnn', teacher)
    ctx = BuildContext(point_shapes(StudentNet(widths=widths), sp, 'cpu'),
                       point_shapes(teacher, tp, 'cpu'), torch.arange(8) % 10, 10)
    images = torch.randn(8, 3, 32, 32)
    idx = torch.arange(8)
    after = []
    for params in ({}, {'beta': 0.0, 'gamma': 0.0} if name == 'rkd' else {'beta': 0.0}):
        torch.manual_seed(1)
        student = StudentNet(widths=widths)
        before = [p.detach().clone() for p in student.parameters()]
        d = build_distiller(name, params, ctx)
        t = Trainee(name, student, name, recipe, torch.device('cpu'),
                    options=TraineeOptions(distiller=d, points=sp))
        held = {id(p) for g in t.optimizer.param_groups for p in g['params']}
        assert all(id(p) in held for p in student.parameters())
        out = train_step([t], fold_batchnorm(teacher, {k: tp[k] for k in d.teacher_points}),
                         images, ctx.train_labels[idx], recipe,
                         batch=Batch(None, None, idx, 0, 0, 0, idx, 0))
        assert set(out[0].parts) == set(get_loss(name).parts)
        assert math.isfinite(out[0].loss.item())
        assert all(math.isfinite(v.item()) for v in out[0].parts.values())
        assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before))
        assert set(t.module.state_dict()) == set(StudentNet(widths=widths).state_dict())
        after.append([p.detach().clone() for p in student.parameters()])
    assert any(not torch.allclose(p, q) for p, q in zip(*after))
