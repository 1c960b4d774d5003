"""The learning-rate schedule, the precision policy, the lockstep step and the saved state's
config."""
import pytest
import torch

from kd.models import StudentNet, TeacherNet
from kd.engine.precision import choose_precision
from kd.engine.state import PhaseProgress, save_state
from kd.engine.step import train_step
from kd.engine.trainee import Trainee
from kd.recipes.base import Recipe
from kd.recipes.optim import lr_at, warmup_steps


def test_warmup_then_cosine_to_zero():
    total, warm, peak = 1000, 30, 0.1
    assert lr_at(0, total, warm, peak) == pytest.approx(peak / warm)
    assert lr_at(warm - 1, total, warm, peak) == pytest.approx(peak)
    assert lr_at(warm, total, warm, peak) == pytest.approx(peak)
    assert lr_at(warm + (total - warm) // 2, total, warm, peak) == pytest.approx(peak / 2, rel=1e-2)
    assert lr_at(total - 1, total, warm, peak) < 1e-5
    lrs = [lr_at(s, total, warm, peak) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_is_3_percent_but_at_least_an_epoch_and_at_most_a_fifth():
    assert warmup_steps(Recipe(epochs=200), 352) == round(0.03 * 200 * 352)
    assert warmup_steps(Recipe(epochs=3), 14) == round(0.2 * 42)
    assert warmup_steps(Recipe(epochs=10), 14) == 14


def test_precision_policy():
    cpu = torch.device('cpu')
    assert choose_precision('student_kd', cpu, None) is None  # the small CNN is slower in bf16
    assert choose_precision('teacher', cpu, False) is None
    assert choose_precision('student_base', cpu, True) == torch.bfloat16


def test_lockstep_step_feeds_both_students_the_same_batch_and_runs_the_teacher_once():
    torch.manual_seed(0)
    recipe = Recipe(epochs=1)
    cpu = torch.device('cpu')
    init = StudentNet().state_dict()
    kd, base = StudentNet(), StudentNet()
    kd.load_state_dict(init)
    base.load_state_dict(init)
    trainees = [Trainee('student_kd', kd, 'kd', recipe, cpu), Trainee('student_base', base, 'ce',
                                                                      recipe, cpu)]
    teacher = TeacherNet().eval()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    seen = []
    for t in trainees:
        t.module.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = train_step(trainees, teacher, images, labels, recipe)
    assert len(calls) == 1
    assert torch.equal(seen[0], seen[1])
    (loss_kd, parts_kd, _), (loss_base, parts_base, _) = out
    ce_kd, kd_term, ce_base = parts_kd['ce'], parts_kd['kd'], parts_base['ce']
    assert set(parts_kd) == {'ce', 'kd'} and set(parts_base) == {'ce'}
    assert loss_kd.item() == pytest.approx(0.1 * ce_kd.item() + 0.9 * kd_term.item(), rel=1e-5)
    # same start, same batch, same CE: the KD term alone made the students differ
    assert ce_kd.item() == pytest.approx(ce_base.item(), rel=1e-6)
    assert not torch.equal(kd.classifier.weight, base.classifier.weight)
    assert all(p.grad is None for p in teacher.parameters())


class _Record:
    """A frozen run record, as the run layer may hand the loop instead of a dict."""

    def to_dict(self):
        return {'epochs': 3, 'loss': ['kd']}


@pytest.mark.parametrize('config, saved', [(None, {}), ({'epochs': 3}, {'epochs': 3}),
                                           (_Record(), {'epochs': 3, 'loss': ['kd']})])
def test_the_state_saves_the_config_as_a_dict_whatever_form_it_comes_in(tmp_path, config, saved):
    trainee = Trainee('s', StudentNet(), 'ce', Recipe(), torch.device('cpu'))
    path = tmp_path / 'last_students.pt'
    save_state(str(path), 'students', [trainee], PhaseProgress(), config)
    assert torch.load(path, weights_only=True)['config'] == saved
