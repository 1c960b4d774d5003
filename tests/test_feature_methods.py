"""Feature distillers (distillers.py, features.py): points by name, the teacher's fast forms,
FitNets / AT / CRD against transcriptions of their authors' code in float64, the logit losses
unchanged, and a run of every method from the command line."""
import glob
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main
from kd.methods.plan import BuildContext, build_distiller, point_shapes
from kd.methods.contrastive import contrast_loss, draw_negatives
from kd.models import MODELS, StudentNet, TeacherNet, build_model, feature_points
from kd.recipes import get_recipe
from kd.engine.step import train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.run.teacher_form import fold_batchnorm
from kd.data.loader import Batch

# ---------------------------------------------------------------------------------------------
# Points


@pytest.mark.parametrize('arch', sorted(MODELS))
def test_every_model_names_the_standard_points_with_their_shapes(arch):
    model = build_model(arch, 100)
    points = feature_points(arch, model)
    shapes = point_shapes(model, points, 'cpu')
    stages = [k for k in shapes if k.startswith('stage') and not k.endswith('_pre')]
    assert len(stages) >= 3 and 'stem' in shapes
    for s in stages:  # a pre-activation point has its stage's shape
        assert shapes[f'{s}_pre'] == shapes[s] and len(shapes[s]) == 4
    sizes = [shapes[s][2] for s in stages]
    assert sizes == sorted(sizes, reverse=True)  # stages go down in resolution
    # the pooled embedding is what the classifier takes
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert shapes['pooled'] == (1, classifier.in_features)


def reference_cifar_resnet_feats(model, x):
    """mdistiller's CIFAR ResNet forward (models/cifar/resnet.py), over our modules."""
    x = F.relu(model.bn1(model.conv1(x)))
    f0 = x
    feats, pre = [f0], [f0]
    for layer in (model.layer1, model.layer2, model.layer3):
        for i, block in enumerate(layer):
            out = F.relu(block.bn1(block.conv1(x)))
            out = block.bn2(block.conv2(out))
            preact = out + (x if block.downsample is None else block.downsample(x))
            x = F.relu(preact)
        feats.append(x)
        pre.append(preact)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return feats, pre, pooled


def reference_wrn_feats(model, x):
    """mdistiller's WRN forward (models/cifar/wrn.py): feats f0..f3 (f3 before the final BN-ReLU),
    preact via the next BN."""
    f0 = model.conv1(x)
    f1 = model.block1(f0)
    f2 = model.block2(f1)
    f3 = model.block3(f2)
    pre = [f0, model.block2.layer[0].bn1(f1), model.block3.layer[0].bn1(f2), model.bn1(f3)]
    return [f0, f1, f2, f3], pre, F.adaptive_avg_pool2d(F.relu(model.bn1(f3)), 1).flatten(1)


@pytest.mark.parametrize('arch,reference', [('resnet8x4', reference_cifar_resnet_feats),
                                            ('wrn_16_2', reference_wrn_feats)])
def test_points_are_the_reference_feats(arch, reference):
    torch.manual_seed(0)
    model = build_model(arch, 100).double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feats, pre, pooled = reference(model, x)
    from kd.models.features import WithPoints
    with torch.no_grad():
        _, got = WithPoints(model, feature_points(arch, model))(x)
        feats, pre, pooled = reference(model, x)
    assert torch.equal(got['stem'], feats[0]) and torch.equal(got['pooled'], pooled)
    for i in (1, 2, 3):
        assert torch.equal(got[f'stage{i}'], feats[i])
        assert torch.allclose(got[f'stage{i}_pre'], pre[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize('arch', ['resnet18', 'cnn', 'resnet8x4', 'wrn_16_2', 'airbench94_small'])
def test_the_folded_teacher_gives_the_eager_features(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    points = feature_points(arch, model)
    x = torch.randn(2, 3, 32, 32)
    from kd.models.features import WithPoints
    with torch.no_grad():
        logits, eager = WithPoints(model, points)(x)
        folded_logits, folded = fold_batchnorm(model, points)(x)
    assert set(folded) == set(points)
    assert torch.allclose(folded_logits, logits, atol=1e-4)
    for k in points:
        assert torch.allclose(folded[k], eager[k], atol=1e-4, rtol=1e-4), k


def test_a_registered_model_names_its_points_by_module_path():
    from kd.models import POINTS, register_model

    @register_model('tiny_test_net', points={'stage1': 'body.0', 'stage2': 'body.2',
                                             'pooled': 'head:in'})
    class Tiny(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1))
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))
    try:
        model = build_model('tiny_test_net')
        shapes = point_shapes(model, feature_points('tiny_test_net', model), 'cpu')
        assert shapes == {'stage1': (1, 4, 16, 16), 'stage2': (1, 8, 8, 8), 'pooled': (1, 8)}
    finally:
        MODELS.pop('tiny_test_net')
        POINTS.pop('tiny_test_net')


# ---------------------------------------------------------------------------------------------
# The logit losses keep their numbers

# 3 float64 steps of each logit loss (epoch 25) on a small StudentNet under a seeded wider one,
# before feature distillers existed: loss of each step and the sum of the weights after, equal to
# 1e-5 (the classifier computes in float32 even in a float64 model, so the CPU's vector width
# changes float32 sums: an AVX2-only CPU and an AVX512 one differ by ~2e-6 relative)
GOLDEN = {
    'kd': (['0x1.020a9d4265119p-2', '0x1.ebe91ec203ebdp-3', '0x1.e031aacec9ad8p-3'],
           '0x1.0773d1d6dc26ep+7'),
    'dkd': (['0x1.40bf5dda80090p+1', '0x1.37f2083392fbep+1', '0x1.3482ef24decc3p+1'],
            '0x1.04a56a6d28a05p+7'),
    'ls': (['0x1.79ad2fd75de6dp+2', '0x1.5e2493c88e214p+0', '0x1.1b058fd0d392fp+1'],
           '0x1.63add3585c6acp+6'),
    'ce': (['0x1.3422874d83b28p+1', '0x1.31c7780f4db8fp+1', '0x1.1cdf0c29f047ap+1'],
           '0x1.f5de9d8b02aa8p+6'),
}


def test_logit_losses_keep_their_numbers():
    torch.manual_seed(0)
    teacher = StudentNet(widths=(16, 16, 32, 32)).double().eval()
    recipe = get_recipe('standard')
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 8, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 8), generator=gen)
    params = {'kd': {'temperature': 4.0, 'alpha': 0.1}, 'dkd': {'temperature': 4.0},
              'ls': {'temperature': 2.0, 'alpha': 0.1}, 'ce': {}}
    for loss, (losses, checksum) in GOLDEN.items():
        torch.manual_seed(2)
        t = Trainee(loss, StudentNet(widths=(8, 16, 16, 32)).double(), loss, recipe,
                    torch.device('cpu'), options=TraineeOptions(loss_params=params[loss]))
        values = [train_step([t], teacher, images[s], labels[s], recipe, None, epoch=25)[0]
                  .loss.item() for s in range(3)]
        assert values == pytest.approx([float.fromhex(v) for v in losses], rel=1e-5), loss
        assert sum(p.sum().item() for p in t.module.parameters()) == \
            pytest.approx(float.fromhex(checksum), rel=1e-5), loss


# ---------------------------------------------------------------------------------------------
# Against the authors' code (float64). The functions below transcribe mdistiller
# (distillers/FitNet.py, AT.py, _common.py ConvReg) and RepDistiller (crd/memory.py
# ContrastMemory, crd/criterion.py ContrastLoss / Embed / Normalize) as published.

def authors_at_loss(g_s, g_t, p):
    def _at(feat, p):
        return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))

    def single(f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        return (_at(f_s, p) - _at(f_t, p)).pow(2).mean()
    return sum(single(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


def authors_contrast_memory(memory_v1, memory_v2, params, v1, v2, y, idx):
    """ContrastMemory.forward with a given contrast_idx; memories and params updated in place."""
    K, T = int(params[0].item()), params[1].item()
    Z_v1, Z_v2, momentum = params[2].item(), params[3].item(), params[4].item()
    batchSize, outputSize, inputSize = v1.size(0), memory_v1.size(0), memory_v1.size(1)
    weight_v1 = torch.index_select(memory_v1, 0, idx.view(-1)).detach()
    weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
    out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1)), T))
    weight_v2 = torch.index_select(memory_v2, 0, idx.view(-1)).detach()
    weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
    out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1)), T))
    if Z_v1 < 0:
        params[2] = out_v1.mean() * outputSize
        Z_v1 = params[2].clone().detach().item()
    if Z_v2 < 0:
        params[3] = out_v2.mean() * outputSize
        Z_v2 = params[3].clone().detach().item()
    out_v1 = torch.div(out_v1, Z_v1).contiguous()
    out_v2 = torch.div(out_v2, Z_v2).contiguous()
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            l_pos = torch.index_select(memory, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            memory.index_copy_(0, y, l_pos.div(l_norm))
    return out_v1, out_v2


def authors_contrast_loss(x, n_data, eps=1e-7):
    bsz, m = x.shape[0], x.size(1) - 1
    Pn = 1. / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def context(student_shapes, teacher_shapes, n=40, classes=5):
    labels = torch.arange(n) % classes
    return BuildContext(student_shapes, teacher_shapes, labels, classes)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def test_fitnet_equals_authors_code():
    torch.manual_seed(0)
    fs = torch.randn(4, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(4, 10, 16, 16, dtype=torch.float64)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    d = build_distiller('fitnet', {}, context({'stage2': fs.shape}, {'stage2': ft.shape})).double()
    assert isinstance(d.regressor.conv, nn.ConvTranspose2d)  # 2 Hs = Ht
    loss, parts = d(logits, None, labels, student_feats={'stage2': fs},
                    teacher_feats={'stage2': ft})
    # mdistiller: CE_WEIGHT 1 * CE + FEAT_WEIGHT 100 * MSE(ConvReg(f_s), f_t), ConvReg = conv, bn, relu
    reg = d.regressor
    expected = F.cross_entropy(logits, labels) + 100.0 * F.mse_loss(
        F.relu(reg.bn(reg.conv(fs))), ft)
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert set(parts) == {'ce', 'fitnet'}
    for a, b in zip(grads(loss, [fs, logits, reg.conv.weight]),
                    grads(expected, [fs, logits, reg.conv.weight])):
        assert torch.allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize('s_size,t_size,kind', [(16, 8, 'stride2'), (8, 16, 'transposed'),
                                                (8, 8, '1x1'), (10, 8, '3x3')])
def test_the_regressor_follows_the_sizes(s_size, t_size, kind):
    d = build_distiller('fitnet', {}, context({'stage2': (1, 3, s_size, s_size)},
                                              {'stage2': (1, 7, t_size, t_size)}))
    out = d.regressor(torch.randn(2, 3, s_size, s_size))
    assert out.shape == (2, 7, t_size, t_size)
    conv = d.regressor.conv
    assert {'stride2': conv.stride == (2, 2) and conv.kernel_size == (3, 3),
            'transposed': isinstance(conv, nn.ConvTranspose2d),
            '1x1': conv.kernel_size == (1, 1), '3x3': conv.kernel_size == (3, 3)}[kind]


def test_at_equals_authors_code():
    torch.manual_seed(0)
    s_shapes = {'stage1': (1, 4, 16, 16), 'stage2': (1, 8, 8, 8), 'stage3': (1, 8, 4, 4)}
    t_shapes = {'stage1': (1, 6, 32, 32), 'stage2': (1, 6, 16, 16), 'stage3': (1, 6, 8, 8),
                'stage4': (1, 6, 4, 4)}
    fs = {k: torch.randn(3, *v[1:], dtype=torch.float64, requires_grad=True)
          for k, v in s_shapes.items()}
    ft = {k: torch.randn(3, *v[1:], dtype=torch.float64) for k, v in t_shapes.items()}
    logits = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    d = build_distiller('at', {}, context(s_shapes, t_shapes))
    assert d.teacher_points == ('stage1', 'stage2', 'stage3')  # zipped as feats[1:]
    loss, parts = d(logits, None, labels, student_feats=fs, teacher_feats=ft)
    at = authors_at_loss([fs[k] for k in s_shapes], [ft[f'stage{i}'] for i in (1, 2, 3)], 2)
    assert torch.allclose(parts['at'], at, rtol=1e-12)
    assert torch.allclose(loss, F.cross_entropy(logits, labels) + 1000.0 * at, rtol=1e-12)
    for a, b in zip(grads(loss, list(fs.values())), grads(1000.0 * at, list(fs.values()))):
        assert torch.allclose(a, b, rtol=1e-10)


def test_crd_equals_authors_code_over_two_steps():
    torch.manual_seed(0)
    n, b, k = 40, 4, 7
    d = build_distiller('crd', {}, context({'pooled': (1, 12)}, {'pooled': (1, 9)}, n)).double()
    d.nce_k = k
    memory_v1, memory_v2 = d.memory_s.clone(), d.memory_t.clone()
    params = torch.tensor([k, 0.07, -1.0, -1.0, 0.5], dtype=torch.float64)
    for step in range(2):
        fs = torch.randn(b, 12, dtype=torch.float64, requires_grad=True)
        ft = torch.randn(b, 9, dtype=torch.float64)
        y = torch.randperm(n)[:b]
        negatives = torch.randint(0, n, (b, k))
        loss = d.crd(fs, ft, y, negatives)
        # the authors': embeddings, memory with contrast_idx, ContrastLoss on both sides
        v1 = F.linear(fs, d.embed_s.linear.weight, d.embed_s.linear.bias)
        v1 = v1.div(v1.pow(2).sum(1, keepdim=True).pow(1. / 2))
        v2 = F.linear(ft, d.embed_t.linear.weight, d.embed_t.linear.bias)
        v2 = v2.div(v2.pow(2).sum(1, keepdim=True).pow(1. / 2))
        idx = torch.cat([y[:, None], negatives], 1)
        out_s, out_t = authors_contrast_memory(memory_v1, memory_v2, params, v1, v2, y, idx)
        expected = (authors_contrast_loss(out_s, n) + authors_contrast_loss(out_t, n)).squeeze()
        assert torch.allclose(loss, expected, rtol=1e-11), step
        wanted = [fs, d.embed_s.linear.weight, d.embed_t.linear.weight]
        for a, e in zip(grads(loss, wanted), grads(expected, wanted)):
            assert torch.allclose(a, e, rtol=1e-9, atol=1e-14), step
        assert torch.allclose(d.memory_s, memory_v1, rtol=1e-12)
        assert torch.allclose(d.memory_t, memory_v2, rtol=1e-12)
        assert torch.allclose(d.z, params[2:4], rtol=1e-12)
    assert torch.allclose(contrast_loss(out_s, n), authors_contrast_loss(out_s, n).squeeze())


def test_negatives_are_other_classes_without_repeats_and_repeat_by_key():
    labels = torch.arange(200) % 4
    anchors = labels[:6]
    draw = draw_negatives(anchors, labels, 50, torch.Generator().manual_seed(3))
    assert draw.shape == (6, 50)
    assert (labels[draw] != anchors[:, None]).all()
    assert all(len(set(row.tolist())) == 50 for row in draw)
    assert torch.equal(draw, draw_negatives(anchors, labels, 50,
                                            torch.Generator().manual_seed(3)))
    # more negatives than a class's others: drawn with replacement, still other classes
    many = draw_negatives(anchors, labels, 400, torch.Generator().manual_seed(3))
    assert many.shape == (6, 400) and (labels[many] != anchors[:, None]).all()


def test_crd_trains_its_heads_with_the_student_and_keeps_them_out_of_the_checkpoint():
    recipe = get_recipe('standard')
    teacher, student = TeacherNet().eval(), StudentNet(widths=(8, 16, 16, 32))
    tp, sp = feature_points('resnet18', teacher), feature_points('cnn', student)
    ctx = BuildContext(point_shapes(student, sp, 'cpu'), point_shapes(teacher, tp, 'cpu'),
                       torch.arange(32) % 10, 10)
    d = build_distiller('crd', {}, ctx)
    t = Trainee('crd', student, 'crd', recipe, torch.device('cpu'),
                options=TraineeOptions(distiller=d, points=sp))
    held = {id(p) for g in t.optimizer.param_groups for p in g['params']}
    assert all(id(p) in held for p in d.parameters())
    before = d.embed_s.linear.weight.detach().clone()
    idx = torch.arange(8)
    out = train_step([t], fold_batchnorm(teacher, {'pooled': tp['pooled']}),
                     torch.randn(8, 3, 32, 32), ctx.train_labels[idx], recipe,
                     batch=Batch(None, None, idx, 0, 0, 0, idx, 0))
    assert set(out[0].parts) == {'ce', 'crd'} and math.isfinite(out[0].loss.item())
    assert not torch.equal(d.embed_s.linear.weight, before)
    assert set(t.module.state_dict()) == set(StudentNet(widths=(8, 16, 16, 32)).state_dict())


def test_batches_name_their_images_and_ranks_slice_one_global_batch():
    from kd.data.loader import make_loaders
    g = torch.Generator().manual_seed(0)
    arrays = (torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g),
              torch.randint(0, 10, (50,), generator=g),
              torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
              torch.randint(0, 10, (10,), generator=g))

    def loader(rank=0, world=1):
        return make_loaders(batch_size=8, val_fraction=0.2, seed=3, arrays=arrays, rank=rank,
                            world_size=world, padding=0).train
    one = loader()
    one.set_epoch(2)
    batches = list(one.batches())
    seen = torch.cat([b.indices for b in batches])
    assert len(seen) == 40 and len(set(seen.tolist())) == 40  # each image once an epoch
    for b in batches:  # the indices are the images and labels of the batch (no crops: flips)
        assert torch.equal(one.labels[b.indices], b.labels)
        for x, i in zip(b.images, b.indices):
            image = one.normalize(one.images[i:i + 1])[0]
            assert torch.equal(x, image) or torch.equal(x, image.flip(-1))
        assert (b.epoch, b.seed, b.row_lo) == (2, 3, 0) and torch.equal(b.global_indices, b.indices)
    halves = [loader(r, 2) for r in (0, 1)]
    for h in halves:
        h.set_epoch(2)
    for b, b0, b1 in zip(batches, *(h.batches() for h in halves)):
        assert torch.equal(torch.cat([b0.indices, b1.indices]), b.indices)
        assert torch.equal(b1.global_indices, b.indices) and b1.row_lo == len(b0.indices)


# ---------------------------------------------------------------------------------------------
# From the command line

def test_every_method_trains_from_the_command_line_in_one_grid(trained_run, tmp_path, capsys):
    """Every registered loss, one lockstep run: a checkpoint each (the plain student), its parts
    in its CSV, the methods' own state in the resume state, results.md ranking them all, and
    --evaluate reproducing the run's numbers."""
    from kd.methods.grid import setting_name
    from kd.methods.registry import LOSSES
    methods = [n for n in LOSSES if n != 'ce']
    out = tmp_path / 'out'
    code = main.main(['--loss', *methods, '--epochs', '1', '--subset', '100', '--batch-size',
                      '32', '--device', 'cpu', '--no-amp', '--data-dir', trained_run['common'][1],
                      '--out-dir', str(out), '--teacher-checkpoint',
                      os.path.join(trained_run['out'], 'best_teacher.pth')])
    assert code == 0
    names = [setting_name(n, LOSSES[n].defaults) for n in methods]
    assert names[:5] == ['kd_T4_a0.1', 'dkd_T4', 'ls_T2_a0.1', 'dist_T4_b2_g2', 'fitnet_b100']
    assert 'rkd_b25_g50' in names and 'reviewkd_b5' in names
    for name in names + ['student_base', 'student_kd']:
        weights = torch.load(out / f'best_{name}.pth', weights_only=True)
        StudentNet().load_state_dict(weights)  # strict: the plain student, nothing else
    header = {n: open(out / f'log_{n}.csv').readline().strip().split(',') for n in names}
    rows = {n: open(out / f'log_{n}.csv').read().splitlines()[1].split(',') for n in names}
    for method, name in zip(methods, names):  # each logs its own parts, finite
        for part in LOSSES[method].parts:
            value = float(rows[name][header[name].index(f'train_{part}')])
            assert math.isfinite(value), (name, part)
    at_column = header['at_b1000'].index('train_at')
    assert float(rows['at_b1000'][at_column]) > 0 and rows['fitnet_b100'][at_column] == ''
    state = torch.load(out / 'last_students.pt', weights_only=True)
    feature = [name for method, name in zip(methods, names) if LOSSES[method].distiller]
    assert set(state['distillers']) == set(feature)
    assert state['distillers']['crd_b0.8']['memory_s'].shape == (90, 128)  # one row per image
    assert {'margin0', 'margin1', 'margin2'} <= set(state['distillers']['ofd_b0.001'])
    assert {'log_scales.0', 'log_scales.2'} <= set(state['distillers']['vid_b1'])
    results = json.loads((out / 'results.json').read_text())
    assert results['config']['students'][names.index('at_b1000')] == {
        'name': 'at_b1000', 'loss': 'at', 'params': {'beta': 1000.0}}
    ranked = (out / 'results.md').read_text()
    assert all(f'| {name} ' in ranked or f'{name} |' in ranked for name in names)
    # --evaluate rebuilds every student as the plain class and reproduces the run's numbers
    capsys.readouterr()
    assert main.main(['--evaluate', '--data-dir', trained_run['common'][1], '--out-dir',
                      str(out), '--device', 'cpu']) == 0
    table = capsys.readouterr().out
    for name in names:
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert f"{results['models'][name]['test_acc']:.2f}" in row


def test_the_teacher_form_keeps_only_the_points_some_student_reads():
    from kd.methods.plan import plan_features
    teacher = TeacherNet().eval()
    students = [('cnn', loss, StudentNet()) for loss in ('kd', 'fitnet', 'at', 'crd')]
    plan = plan_features(students, teacher, feature_points('resnet18', teacher), 'cpu', 10)
    # fitnet's hint (stage2), at's stages zipped with the student's three, crd's embedding
    assert sorted(plan.teacher_points) == ['pooled', 'stage1', 'stage2', 'stage3']
    assert plan_features(students[:1], teacher, feature_points('resnet18', teacher), 'cpu',
                         10) is None  # logit losses only: the teacher's form is unchanged


def test_a_feature_method_on_a_model_without_points_is_refused(trained_run, tmp_path, capsys):
    from kd.models import register_model

    @register_model('pointless_test_net')
    def pointless(num_classes=10):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    try:
        code = main.main(['--loss', 'fitnet', '--student-arch', 'pointless_test_net',
                          '--epochs', '1', '--subset', '100', '--device', 'cpu', '--no-amp',
                          '--data-dir', trained_run['common'][1], '--out-dir', str(tmp_path),
                          '--teacher-checkpoint',
                          os.path.join(trained_run['out'], 'best_teacher.pth')])
    finally:
        MODELS.pop('pointless_test_net')
    err = capsys.readouterr().err
    assert code == 2 and "'pointless_test_net' names no feature points" in err
    assert not glob.glob(str(tmp_path / '*.pth'))


@pytest.mark.slow
def test_compiled_forms_give_the_eager_features_and_steps():
    """--compile: the teacher's compiled form returns its points, and a feature student
    compiled with its hooks takes the eager steps."""
    from kd.run.teacher_form import compile_frozen
    from kd.models.features import WithPoints
    torch.manual_seed(0)
    teacher = TeacherNet().eval()
    tp = feature_points('resnet18', teacher)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        logits, feats = compile_frozen(fold_batchnorm(teacher, tp))(x)
        eager_logits, eager = WithPoints(teacher, tp)(x)
    assert torch.allclose(logits, eager_logits, atol=1e-4)
    assert max((feats[k] - eager[k]).abs().max().item() for k in tp) < 1e-4
    recipe = get_recipe('standard')
    sp = feature_points('cnn', StudentNet(widths=(8, 16, 16, 32)))
    ctx = BuildContext(point_shapes(StudentNet(widths=(8, 16, 16, 32)), sp, 'cpu'),
                       point_shapes(teacher, tp, 'cpu'), torch.arange(16) % 10, 10)
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        student = StudentNet(widths=(8, 16, 16, 32))
        t = Trainee('at', student, 'at', recipe, torch.device('cpu'), options=TraineeOptions(
            compile_model=compiled, distiller=build_distiller('at', {}, ctx), points=sp))
        idx = torch.arange(16)
        out = train_step([t], WithPoints(teacher, tp), x.repeat(4, 1, 1, 1), ctx.train_labels,
                         recipe, batch=Batch(None, None, idx, 0, 0, 0, idx, 0))
        results.append((out[0].loss.item(), out[0].parts['at'].item(),
                        [p.detach().clone() for p in student.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-4)
    # the same update, up to float32 rounding of a compiled graph
    torch.manual_seed(1)
    before = list(StudentNet(widths=(8, 16, 16, 32)).parameters())
    for a, b, p in zip(results[0][2], results[1][2], before):
        assert (a - b).abs().max() <= 1e-3 * (a - p).abs().max() + 1e-7
