"""DIST and the logit standardisation switch (losses.py) against transcriptions of their authors'
code in float64, values and gradients, and the switch through grids and setting names.

The functions below transcribe, as published: DIST's lib/models/losses/dist_kd.py
(hunto/image_classification_sota) with its CIFAR configuration (dist_cifar.yaml: CE weight 1,
kd_loss_weight 2, kd 'dist_t4'), and sunshangquan/logit-standardization-KD's normalize(),
KD.py kd_loss and DKD.py dkd_loss with what tools/train.py's --logit-stand sets (--base-temp 2,
--kd-weight 9: KD_WEIGHT 9; DKD ALPHA and BETA x 9)."""
import pytest
import torch
import torch.nn.functional as F

from kd.methods.grid import expand_grid, setting_name
from kd.methods.registry import LOSSES, get_loss

# ---------------------------------------------------------------------------------------------
# The authors' code


def authors_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def authors_dist(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0):
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s = (z_s / tau).softmax(dim=1)
    y_t = (z_t / tau).softmax(dim=1)
    inter_loss = tau ** 2 * inter_class_relation(y_s, y_t)
    intra_loss = tau ** 2 * intra_class_relation(y_s, y_t)
    return beta * inter_loss + gamma * intra_loss, inter_loss, intra_loss


def authors_ls_kd(s_in, t_in, temperature, logit_stand):
    s = authors_normalize(s_in) if logit_stand else s_in
    t = authors_normalize(t_in) if logit_stand else t_in
    log_pred_student = F.log_softmax(s / temperature, dim=1)
    pred_teacher = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction='none').sum(1).mean() \
        * temperature ** 2


def authors_ls_dkd(s_in, t_in, target, alpha, beta, temperature, logit_stand):
    s = authors_normalize(s_in) if logit_stand else s_in
    t = authors_normalize(t_in) if logit_stand else t_in
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = torch.ones_like(s).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(p):
        return torch.cat([(p * gt).sum(dim=1, keepdims=True), (p * other).sum(1, keepdims=True)],
                         dim=1)
    pred_student = cat_mask(F.softmax(s / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(t / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction='sum') \
        * temperature ** 2 / target.shape[0]
    pt2 = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    ls2 = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction='sum') * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


# ---------------------------------------------------------------------------------------------


def cifar100_logits(b=8, seed=0):
    """float64 logits of a CIFAR-100 batch (the zoo's 100 classes), the student's needing grad."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, 100, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(b, 100, generator=g, dtype=torch.float64) * 4
    return s, t, torch.randint(0, 100, (b,), generator=g)


def assert_same(loss, expected, wrt, rtol=1e-10):
    assert torch.allclose(loss, expected, rtol=rtol, atol=0)
    (a,) = torch.autograd.grad(loss, wrt, retain_graph=True)
    (b,) = torch.autograd.grad(expected, wrt, retain_graph=True)
    assert torch.allclose(a, b, rtol=rtol, atol=1e-15)


@pytest.mark.parametrize('ls', [False, True])
def test_dist_equals_authors_code_at_their_cifar_setting(ls):
    s, t, y = cifar100_logits()
    loss, parts = get_loss('dist').fn(s, t, y, logit_standardization=ls)
    zs, zt = (authors_normalize(s), authors_normalize(t)) if ls else (s, t)
    kd, inter, intra = authors_dist(zs, zt, tau=4.0)
    expected = F.cross_entropy(s, y) + 2.0 * kd   # ori_loss_weight 1, kd_loss_weight 2
    assert_same(loss, expected, s)
    assert torch.allclose(parts['dist_inter'], inter, rtol=1e-12)
    assert torch.allclose(parts['dist_intra'], intra, rtol=1e-12)
    assert torch.allclose(parts['ce'], F.cross_entropy(s, y), rtol=1e-12)


def test_dist_beta_and_gamma_weight_the_inter_and_intra_class_relations():
    s, t, y = cifar100_logits(seed=1)
    loss, _ = get_loss('dist').fn(s, t, y, temperature=2.0, beta=0.5, gamma=3.0)
    kd, _, _ = authors_dist(s, t, beta=0.5, gamma=3.0, tau=2.0)
    assert_same(loss, F.cross_entropy(s, y) + kd, s)
    only_inter, parts = get_loss('dist').fn(s, t, y, gamma=0.0)
    assert torch.allclose(only_inter, parts['ce'] + 2.0 * parts['dist_inter'], rtol=1e-12)


def test_kd_with_the_switch_is_the_authors_kd_with_logit_stand_and_is_ls():
    s, t, y = cifar100_logits(seed=2)
    (name, params), = expand_grid(['kd'], logit_standardization=['on'])
    assert params == {'temperature': 2.0, 'alpha': 0.1, 'logit_standardization': True}
    loss, parts = get_loss('kd').fn(s, t, y, **params)
    # CE_WEIGHT 0.1, KD_WEIGHT 9 (--kd-weight), T 2 (--base-temp)
    expected = 0.1 * F.cross_entropy(s, y) + 9.0 * authors_ls_kd(s, t, 2.0, True)
    assert_same(loss, expected, s)
    ls_loss, ls_parts = get_loss('ls').fn(s, t, y)
    assert torch.equal(ls_loss, loss) and torch.equal(ls_parts['kd'], parts['kd'])
    plain, _ = get_loss('kd').fn(s, t, y, temperature=2.0)  # off: the plain KD
    assert_same(plain, 0.1 * F.cross_entropy(s, y) + 0.9 * authors_ls_kd(s, t, 2.0, False), s)


@pytest.mark.parametrize('epoch', [5, 30])
def test_dkd_with_the_switch_is_the_authors_dkd_with_logit_stand(epoch):
    s, t, y = cifar100_logits(seed=3)
    (_, params), = expand_grid(['dkd'], logit_standardization=['on'])
    assert params == {'temperature': 2.0, 'logit_standardization': True}
    loss, _ = get_loss('dkd').fn(s, t, y, epoch=epoch, **params)
    # CE_WEIGHT 1; ALPHA 1 * 9, BETA 8 * 9, T 2; the warm-up over 20 epochs
    expected = F.cross_entropy(s, y) + min(epoch / 20, 1.0) * authors_ls_dkd(
        s, t, y, 9.0, 72.0, 2.0, True)
    assert_same(loss, expected, s, rtol=1e-9)


def test_the_switch_in_grids_and_names():
    grid = expand_grid(['kd', 'dkd', 'dist', 'fitnet', 'ls'], temperatures=None,
                       logit_standardization=['off', 'on'])
    names = [setting_name(*g) for g in grid]
    assert names == ['kd_T4_a0.1', 'kd_T2_a0.1_ls', 'dkd_T4', 'dkd_T2_ls', 'dist_T4_b2_g2',
                     'dist_T4_b2_g2_ls', 'fitnet_b100', 'ls_T2_a0.1']
    # off leaves a setting's params and name as they were before the switch existed
    assert grid[0] == ('kd', {'temperature': 4.0, 'alpha': 0.1})
    # a given temperature applies with the switch on and off
    assert [setting_name(*g) for g in expand_grid(['dkd'], [3], logit_standardization=['on'])] \
        == ['dkd_T3_ls']
    with pytest.raises(ValueError, match='on or off'):
        expand_grid(['kd'], logit_standardization=['yes'])


def test_every_loss_that_takes_the_switch_standardises_its_logits():
    """z-scoring makes a loss blind to a per-sample shift and scale of either logits."""
    s, t, y = cifar100_logits(seed=4)
    for name in [n for n, spec in LOSSES.items() if spec.takes_ls]:
        fn = get_loss(name).fn
        _, parts = fn(s, t, y, epoch=30, logit_standardization=True)
        shift = torch.randn(len(y), 1, dtype=torch.float64)
        _, moved = fn(s * 3 + shift, t * 0.5 - shift, y, epoch=30, logit_standardization=True)
        for k in parts:
            if k != 'ce':
                assert torch.allclose(parts[k], moved[k], rtol=1e-6), (name, k)
