"""The two networks and the KD loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd.models import StudentNet, TeacherNet, count_macs, count_parameters
from utils import kd_loss, kd_loss_terms


def test_output_shapes_and_default_construction():
    x = torch.randn(4, 3, 32, 32)
    assert TeacherNet()(x).shape == (4, 10)
    assert StudentNet()(x).shape == (4, 10)
    assert StudentNet(num_classes=7)(x).shape == (4, 7)


def test_teacher_is_resnet18_and_student_is_small():
    teacher, student = TeacherNet(), StudentNet()
    assert 11.0e6 < count_parameters(teacher) < 11.3e6
    assert count_parameters(student) <= count_parameters(teacher) / 8
    assert count_macs(student) <= count_macs(teacher) / 5
    # a plain CNN: no residual shortcuts anywhere
    assert not any('shortcut' in name for name, _ in student.named_modules())


def reference_kd(student, teacher, labels, t, alpha):
    """Written out by hand in float64, one sample at a time."""
    student, teacher = student.double(), teacher.double()
    total = 0.0
    for s, te, y in zip(student, teacher, labels):
        ce = -(s[y] - torch.logsumexp(s, 0))
        p = torch.softmax(te / t, 0)
        q = torch.softmax(s / t, 0)
        kl = (p * (p.log() - q.log())).sum()
        total = total + alpha * ce + (1 - alpha) * t * t * kl
    return total / len(labels)


@pytest.mark.parametrize('t', [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.5, 1.0])
def test_kd_loss_matches_hand_written_reference(t, alpha):
    g = torch.Generator().manual_seed(int(t * 10 + alpha * 100))
    student = torch.randn(16, 10, generator=g) * 3
    teacher = torch.randn(16, 10, generator=g) * 3
    labels = torch.randint(0, 10, (16,), generator=g)
    got = kd_loss(student, teacher, labels, temperature=t, alpha=alpha)
    assert got.dim() == 0
    assert got.item() == pytest.approx(reference_kd(student, teacher, labels, t, alpha).item(),
                                       rel=1e-5, abs=1e-6)


def test_alpha_weights_the_hard_labels():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(student, labels)
    assert kd_loss(student, teacher, labels, 4.0, alpha=1.0).item() == pytest.approx(ce.item())
    loss, ce_part, kd_part = kd_loss_terms(student, teacher, labels, 4.0, 0.1)
    assert loss.item() == pytest.approx(0.1 * ce_part.item() + 0.9 * kd_part.item(), rel=1e-6)


def test_kd_term_is_zero_when_logits_match():
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert kd_loss(logits, logits.clone(), labels, 4.0, alpha=0.0).item() == pytest.approx(0, abs=1e-6)


def test_no_gradient_reaches_the_teacher():
    student = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10, requires_grad=True)
    kd_loss(student, teacher, torch.randint(0, 10, (8,)), 4.0, 0.1).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_bf16_logits_give_an_fp32_loss():
    student = torch.randn(8, 10).bfloat16()
    teacher = torch.randn(8, 10).bfloat16()
    loss = kd_loss(student, teacher, torch.randint(0, 10, (8,)), 4.0, 0.1)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_compiled_and_wrapped_models_save_plain_state_dicts():
    from kd.files.checkpoint import plain_state_dict, strip_prefixes
    model = StudentNet()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert any(k.startswith('_orig_mod.') for k in compiled.state_dict())
    state = plain_state_dict(compiled)
    assert list(state) == list(model.state_dict())
    assert strip_prefixes({'module._orig_mod.conv.weight': 1}) == {'conv.weight': 1}
    StudentNet().load_state_dict(state)
