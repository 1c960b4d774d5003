"""The distillation-loss registry (losses.py): values against hand-written float64 references,
gradients, dtypes, and the command-line grid helpers."""
import dataclasses
import inspect
import math

import pytest
import torch

import utils
from kd.methods.grid import expand_grid, setting_name
from kd.methods.registry import LOSSES, get_loss, register_loss

LOGIT = [name for name, spec in LOSSES.items() if spec.fn is not None]
FEATURE_METHODS = ['fitnet', 'at', 'nst', 'vid', 'ofd', 'sp', 'rkd', 'pkt', 'kdsvd', 'crd',
                   'crd_kd', 'reviewkd']

DISTILL = ['kd', 'dkd', 'ls']
DISTILL_PARTS = {'kd': ['kd'], 'dkd': ['tckd', 'nckd'], 'ls': ['kd']}


def logits(b=6, c=10, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s.to(dtype), t.to(dtype), y


# ---------------------------------------------------------------------------------------------
# Independent references, written from the papers' formulas one sample at a time

def softmax_ref(z):
    e = [math.exp(v - max(z)) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl_ref(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ce_ref(z, y):
    return -math.log(softmax_ref(z)[y])


def dkd_reference(s, t, y, temperature, epoch):
    """Zhao et al. (2022): CE + min(epoch/20, 1) * (1 * TCKD + 8 * NCKD), per-sample mean."""
    ce = tckd = nckd = 0.0
    n = len(y)
    for zs, zt, label in zip(s.tolist(), t.tolist(), y.tolist()):
        ps = softmax_ref([v / temperature for v in zs])
        pt = softmax_ref([v / temperature for v in zt])
        bs, bt = [ps[label], 1 - ps[label]], [pt[label], 1 - pt[label]]
        # non-target distribution: p_i / (1 - p_y) for i != y
        hs = [p / (1 - ps[label]) for i, p in enumerate(ps) if i != label]
        ht = [p / (1 - pt[label]) for i, p in enumerate(pt) if i != label]
        ce += ce_ref(zs, label) / n
        tckd += temperature ** 2 * kl_ref(bt, bs) / n
        nckd += temperature ** 2 * kl_ref(ht, hs) / n
    w = min(epoch / 20, 1.0)
    return ce + w * (1.0 * tckd + 8.0 * nckd), ce, tckd, nckd


def ls_reference(s, t, y, temperature, alpha, ddof=1):
    """Sun et al. (2024): alpha * CE + 10 (1 - alpha) T^2 KL on z-scored logits; the authors'
    logit.std() is torch's default unbiased estimator (ddof=1)."""
    def zscore(z):
        mean = sum(z) / len(z)
        std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - ddof))
        return [(v - mean) / (std + 1e-7) for v in z]

    ce = kd = 0.0
    n = len(y)
    for zs, zt, label in zip(s.tolist(), t.tolist(), y.tolist()):
        ps = softmax_ref([v / temperature for v in zscore(zs)])
        pt = softmax_ref([v / temperature for v in zscore(zt)])
        ce += ce_ref(zs, label) / n
        kd += temperature ** 2 * kl_ref(pt, ps) / n
    return alpha * ce + 10 * (1 - alpha) * kd, ce, kd


def close(a, b, tol=1e-9):
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------------------------------------
# Values

@pytest.mark.parametrize('temperature,alpha', [(4.0, 0.1), (1.0, 0.5), (2.5, 0.0), (8.0, 1.0)])
def test_kd_equals_utils_kd_loss_terms(temperature, alpha):
    s, t, y = logits(b=32, dtype=torch.float32, seed=1)
    loss, parts = get_loss('kd').fn(s, t, y, temperature=temperature, alpha=alpha)
    ref_loss, ref_ce, ref_kd = utils.kd_loss_terms(s, t, y, temperature, alpha)
    assert set(parts) == {'ce', 'kd'}
    for got, ref in ((loss, ref_loss), (parts['ce'], ref_ce), (parts['kd'], ref_kd)):
        assert got.dtype == ref.dtype == torch.float32
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    # and with no hyper-parameters given: the defaults are today's defaults
    assert torch.allclose(get_loss('kd').fn(s, t, y)[0], utils.kd_loss(s, t, y), atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0, 7.5])
@pytest.mark.parametrize('epoch', [1, 10, 20, 30, 2.5])
def test_dkd_matches_float64_reference(temperature, epoch):
    s, t, y = logits(b=5, c=7, seed=int(temperature * 10))
    loss, parts = get_loss('dkd').fn(s, t, y, epoch=epoch, temperature=temperature)
    ref_loss, ref_ce, ref_tckd, ref_nckd = dkd_reference(s, t, y, temperature, epoch)
    assert set(parts) == {'ce', 'tckd', 'nckd'}
    assert loss.dtype == torch.float64
    assert close(parts['ce'], ref_ce)
    assert close(parts['tckd'], ref_tckd)
    assert close(parts['nckd'], ref_nckd)
    assert close(loss, ref_loss)


def test_dkd_warmup_factor():
    s, t, y = logits(seed=3)
    fn = get_loss('dkd').fn
    ce_only = fn(s, t, y, epoch=0)[0]
    _, parts = fn(s, t, y)
    dist = 1.0 * parts['tckd'] + 8.0 * parts['nckd']
    assert close(ce_only, parts['ce'])
    for epoch, w in ((1, 0.05), (10, 0.5), (20, 1.0), (30, 1.0), (240, 1.0)):
        assert close(fn(s, t, y, epoch=epoch)[0], parts['ce'] + w * dist)


def test_dkd_decomposes_classical_kd():
    """The paper's identity, per sample: KD = TCKD + (1 - p_y^teacher) * NCKD."""
    s, t, y = logits(b=1, seed=4)
    for temperature in (1.0, 3.0):
        _, parts = get_loss('dkd').fn(s, t, y, temperature=temperature)
        _, kd_parts = get_loss('kd').fn(s, t, y, temperature=temperature)
        pt_y = torch.softmax(t / temperature, dim=1)[0, y[0]]
        assert close(kd_parts['kd'], parts['tckd'] + (1 - pt_y) * parts['nckd'])


def test_dkd_equals_authors_code_and_stays_finite_where_it_would_not():
    """Transcription of mdistiller's dkd_loss (target logit/T minus 1000, then log of the
    two-way probabilities): same values on ordinary logits; on huge logits ours stays finite and
    right while the -1000 mask no longer removes the target class."""
    import torch.nn.functional as F

    def authors(s, t, y, temperature):
        gt = torch.zeros_like(s).scatter_(1, y[:, None], 1).bool()
        other = ~gt
        ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
        cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True),  # noqa: E731
                                   (p * other).sum(1, keepdim=True)], 1)
        tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction='sum') * temperature ** 2 / len(y)
        pt2 = F.softmax(t / temperature - 1000.0 * gt, 1)
        ls2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
        nckd = F.kl_div(ls2, pt2, reduction='sum') * temperature ** 2 / len(y)
        return tckd, nckd

    s, t, y = logits(b=16, seed=5, dtype=torch.float32)
    _, parts = get_loss('dkd').fn(s, t, y)
    tckd, nckd = authors(s, t, y, 4.0)
    assert torch.allclose(parts['tckd'], tckd, rtol=1e-5, atol=1e-6)
    assert torch.allclose(parts['nckd'], nckd, rtol=1e-5, atol=1e-6)

    # the teacher's target logit so large that 1 - p_y underflows and -1000 is not enough
    s, t, y = logits(b=4, seed=6, dtype=torch.float32)
    t = t.clone()
    t[torch.arange(4), y] = 1e5
    s = s.clone().requires_grad_(True)
    loss, parts = get_loss('dkd').fn(s, t, y, epoch=30)
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # the paper's non-target distribution, softmax over the other classes' logits, in float64
    nckd_ref = 0.0
    for zs, zt, label in zip(s.detach().double().tolist(), t.double().tolist(), y.tolist()):
        hs = softmax_ref([v / 4.0 for i, v in enumerate(zs) if i != label])
        ht = softmax_ref([v / 4.0 for i, v in enumerate(zt) if i != label])
        nckd_ref += 16.0 * kl_ref(ht, hs) / len(y)
    assert close(parts['nckd'], nckd_ref, tol=1e-5)
    assert not close(authors(s.detach(), t, y, 4.0)[1], nckd_ref, tol=1e-2)  # -1000 falls short


@pytest.mark.parametrize('temperature,alpha', [(2.0, 0.1), (1.0, 0.5), (4.0, 0.0), (8.0, 1.0)])
def test_ls_matches_float64_reference(temperature, alpha):
    s, t, y = logits(b=5, c=10, seed=7, scale=2.0)
    loss, parts = get_loss('ls').fn(s, t, y, temperature=temperature, alpha=alpha)
    ref_loss, ref_ce, ref_kd = ls_reference(s, t, y, temperature, alpha)
    assert set(parts) == {'ce', 'kd'}
    assert loss.dtype == torch.float64
    assert close(parts['ce'], ref_ce)
    assert close(parts['kd'], ref_kd)
    assert close(loss, ref_loss)


def test_ls_default_weights_are_the_authors():
    s, t, y = logits(seed=8)
    loss, parts = get_loss('ls').fn(s, t, y)
    assert close(loss, 0.1 * parts['ce'] + 9 * parts['kd'])
    # standardisation: the loss does not change when a logit vector is shifted and rescaled
    _, shifted = get_loss('ls').fn(3 * s + 5, 0.5 * t - 2, y)
    assert close(shifted['kd'], parts['kd'], tol=1e-6)
    # the unbiased (n - 1) std, not the population one: the two references differ clearly
    ref_unbiased = ls_reference(s, t, y, 2.0, 0.1)[2]
    ref_population = ls_reference(s, t, y, 2.0, 0.1, ddof=0)[2]
    assert close(parts['kd'], ref_unbiased)
    assert not close(parts['kd'], ref_population, tol=1e-3)


def test_ce_is_plain_cross_entropy_and_needs_no_teacher():
    s, _, y = logits(seed=9)
    spec = get_loss('ce')
    loss, parts = spec.fn(s, None, y, epoch=3)
    assert set(parts) == {'ce'} and spec.uses_teacher is False and spec.defaults == {}
    n = len(y)
    assert close(loss, sum(ce_ref(z, label) for z, label in zip(s.tolist(), y.tolist())) / n)


# ---------------------------------------------------------------------------------------------
# Gradients and dtypes

@pytest.mark.parametrize('name', DISTILL)
def test_distillation_gradient_vanishes_when_student_equals_teacher(name):
    _, t, y = logits(seed=10, dtype=torch.float32)
    s = t.clone().requires_grad_(True)
    _, parts = get_loss(name).fn(s, t, y, epoch=30)
    for part in DISTILL_PARTS[name]:
        (grad,) = torch.autograd.grad(parts[part], s, retain_graph=True)
        assert grad.abs().max() < 1e-6, part
        assert abs(float(parts[part].detach())) < 1e-6, part
    (grad,) = torch.autograd.grad(parts['ce'], s)
    assert grad.abs().max() > 1e-3


@pytest.mark.parametrize('name', LOGIT)
def test_no_gradient_reaches_the_teacher(name):
    s, t, y = logits(seed=11, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss, _ = get_loss(name).fn(s, t, y, epoch=5)
    loss.backward()
    assert t.grad is None or not t.grad.any()
    assert s.grad is not None and s.grad.abs().max() > 0


@pytest.mark.parametrize('name', LOGIT)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32(name, dtype):
    s, t, y = logits(seed=12, dtype=dtype)
    loss, parts = get_loss(name).fn(s, t, y, epoch=5)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in parts.values())
    ref, _ = get_loss(name).fn(s.float(), t.float(), y, epoch=5)
    assert torch.equal(loss, ref)


# ---------------------------------------------------------------------------------------------
# Registry

def test_registry_entries():
    assert LOGIT == ['ce', 'kd', 'dkd', 'ls', 'dist']
    assert [n for n in LOSSES if n not in LOGIT] == FEATURE_METHODS
    for name in FEATURE_METHODS:
        spec = get_loss(name)
        assert spec.uses_teacher and spec.parts[0] == 'ce' and '--beta' in spec.help
        assert spec.help.endswith('.') and not spec.takes_ls
    assert dict(get_loss('kd').defaults) == {'temperature': 4.0, 'alpha': 0.1}
    assert dict(get_loss('dkd').defaults) == {'temperature': 4.0}
    assert dict(get_loss('ls').defaults) == {'temperature': 2.0, 'alpha': 0.1}
    assert dict(get_loss('dist').defaults) == {'temperature': 4.0, 'beta': 2.0, 'gamma': 2.0}
    # the logit standardisation switch: kd, dkd and dist take it; kd and dkd then default to T 2
    assert [n for n in LOSSES if LOSSES[n].takes_ls] == ['kd', 'dkd', 'dist']
    assert dict(get_loss('dkd').defaults_for(True)) == {'temperature': 2.0,
                                                        'logit_standardization': True}
    assert dict(get_loss('dist').defaults_for(True))['temperature'] == 4.0
    for name in LOGIT:
        spec = LOSSES[name]
        assert spec.name == name
        assert spec.uses_teacher == (name != 'ce')
        assert isinstance(spec.help, str) and spec.help.endswith('.')
        assert '--alpha' in spec.help and '--temperature' in spec.help
        # the function's keyword defaults are the registered ones
        params = inspect.signature(spec.fn).parameters
        assert params['epoch'].default == 1
        hypers = {k: p.default for k, p in params.items()
                  if p.kind is p.KEYWORD_ONLY and k != 'epoch'}
        assert hypers.pop('logit_standardization', None) is (False if spec.takes_ls else None)
        assert hypers == {k: h.default for k, h in spec.settings.items()}
        assert dict(spec.defaults) == {k: h.default for k, h in spec.settings.items() if h.axis}
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = 'other'
        with pytest.raises(TypeError):
            spec.defaults['temperature'] = 1.0


@pytest.mark.parametrize('name', LOGIT)
def test_declared_parts_are_the_returned_parts(name):
    s, t, y = logits(seed=13, dtype=torch.float32)
    _, parts = get_loss(name).fn(s, t, y, epoch=5)
    assert list(parts) == list(get_loss(name).parts)


def test_register_refuses_duplicates_and_unknown_hyper_parameters():
    before = dict(LOSSES)
    with pytest.raises(ValueError, match='already registered'):
        register_loss('kd', help='x.', parts=('ce',))(lambda s, t, y, *, epoch=1: None)
    with pytest.raises(ValueError, match='delta'):
        register_loss('new', defaults={'delta': 1.0}, help='x.', parts=('ce',))
    assert LOSSES == before
    try:
        @register_loss('tmp_test_loss', help='x.', parts=('ce',))
        def tmp(s, t, y, *, epoch=1):
            return s.sum(), {'ce': s.sum()}
        assert get_loss('tmp_test_loss').fn is tmp
    finally:
        LOSSES.pop('tmp_test_loss', None)


def test_get_loss_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as info:
        get_loss('fitnett')
    message = str(info.value)
    assert 'fitnett' in message and all(name in message for name in LOSSES)


# ---------------------------------------------------------------------------------------------
# Grid helpers

def test_expand_grid_full():
    grid = expand_grid(['kd', 'dkd', 'ls'], [2, 4, 8], [0.1, 0.5])
    expected = ([('kd', {'temperature': t, 'alpha': a}) for t in (2, 4, 8) for a in (0.1, 0.5)]
                + [('dkd', {'temperature': t}) for t in (2, 4, 8)]
                + [('ls', {'temperature': t, 'alpha': a}) for t in (2, 4, 8) for a in (0.1, 0.5)])
    assert grid == expected and len(grid) == 15
    # keys in order temperature, alpha; values floats
    assert list(grid[0][1]) == ['temperature', 'alpha']
    assert all(isinstance(v, float) for _, p in grid for v in p.values())
    assert [setting_name(*g) for g in grid[:3]] == ['kd_T2_a0.1', 'kd_T2_a0.5', 'kd_T4_a0.1']


def test_expand_grid_defaults_duplicates_and_errors():
    assert expand_grid(['kd']) == [('kd', {'temperature': 4.0, 'alpha': 0.1})]
    assert expand_grid(['ce', 'dkd', 'ls']) == [
        ('ce', {}), ('dkd', {'temperature': 4.0}), ('ls', {'temperature': 2.0, 'alpha': 0.1})]
    # values for a hyper-parameter a loss does not take are ignored
    assert expand_grid(['ce', 'dkd'], alphas=[0.2, 0.3]) == [('ce', {}), ('dkd', {'temperature': 4.0})]
    assert expand_grid(['dkd'], temperatures=[2], alphas=[0.3]) == [('dkd', {'temperature': 2.0})]
    # duplicates removed, first occurrence kept
    assert expand_grid(['kd', 'kd'], [4, 4.0, 2], [0.1]) == [
        ('kd', {'temperature': 4.0, 'alpha': 0.1}), ('kd', {'temperature': 2.0, 'alpha': 0.1})]
    with pytest.raises(KeyError, match='nope'):
        expand_grid(['kd', 'nope'])
    with pytest.raises(ValueError):
        expand_grid(['kd'], temperatures=[0])
    with pytest.raises(ValueError):
        expand_grid(['kd'], alphas=[1.5])
    with pytest.raises(ValueError):
        expand_grid(['kd'], temperatures=[])


def test_setting_name():
    assert setting_name('kd', {'temperature': 4.0, 'alpha': 0.1}) == 'kd_T4_a0.1'
    assert setting_name('dkd', {'temperature': 4.0}) == 'dkd_T4'
    assert setting_name('dkd', {'temperature': 4.0, 'alpha': 0.5}) == 'dkd_T4'
    assert setting_name('ls', {'temperature': 2, 'alpha': 0.1}) == 'ls_T2_a0.1'
    assert setting_name('ce', {'temperature': 4.0}) == 'ce'
    assert setting_name('kd', {'temperature': 2.5}) == 'kd_T2.5_a0.1'
    with pytest.raises(KeyError):
        setting_name('nope', {})
    names = [setting_name(*g) for g in expand_grid(list(LOSSES), [2, 4], [0.1, 0.9])]
    assert len(names) == len(set(names))
