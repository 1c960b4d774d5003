"""Students trained as one vmapped stack equal the one-by-one loop (float64: to 1e-9)."""
import copy
import pytest
import torch

from kd.models import StudentNet, build_model
from kd.engine.stacked import StudentStack, stacking_problem
from kd.engine.step import train_step, train_step_stacked
from kd.engine.trainee import Trainee, TraineeOptions
from kd.recipes.base import Recipe
from kd.run.tuning import time_both

SETTINGS = [('kd', {'temperature': 4.0, 'alpha': 0.1}), ('dkd', {'temperature': 4.0}),
            ('ls', {'temperature': 2.0, 'alpha': 0.1}), ('ce', {})]


def _trainees(recipe, dtype=torch.float64):
    torch.manual_seed(0)
    initial = StudentNet().state_dict()
    trainees = []
    for i, (loss, params) in enumerate(SETTINGS):
        module = StudentNet()
        module.load_state_dict(initial)
        trainees.append(Trainee(f's{i}', module.to(dtype), loss, recipe, torch.device('cpu'),
                                options=TraineeOptions(loss_params=params)))
    return trainees


def test_stacked_steps_equal_the_loop():
    recipe = Recipe(epochs=1, lr=0.05)
    teacher = build_model('resnet8x4').double().eval()
    loop = _trainees(recipe)
    stack_trainees = copy.deepcopy(loop)
    stack = StudentStack(stack_trainees, recipe)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        images = torch.randn(16, 3, 32, 32, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 10, (16,), generator=g)
        a = train_step(loop, teacher, images, labels, recipe, epoch=step + 1)
        b = train_step_stacked(stack, teacher, images, labels, epoch=step + 1)
        for ra, rb in zip(a, b):
            assert ra.loss.item() == pytest.approx(rb.loss.item(), rel=1e-9, abs=1e-12)
            assert ra.parts.keys() == rb.parts.keys()
            assert int(ra.correct) == int(rb.correct)
    stack.write_back()
    for ta, tb in zip(loop, stack_trainees):
        for (k, va), vb in zip(ta.module.state_dict().items(), tb.module.state_dict().values()):
            assert torch.allclose(va.double(), vb.double(), rtol=1e-9, atol=1e-11), k
        for pa, pb in zip(ta.module.parameters(), tb.module.parameters()):
            ma = ta.optimizer.state[pa]['momentum_buffer']
            mb = tb.optimizer.state[pb]['momentum_buffer']
            assert torch.allclose(ma, mb, rtol=1e-9, atol=1e-11)
    # the students really differ from each other: one loss per slice, not a shared gradient
    weights = [t.module.classifier.weight for t in stack_trainees]
    assert not torch.allclose(weights[0], weights[3])


def test_a_stack_restarts_from_the_trainees_momentum():
    recipe = Recipe(epochs=1, lr=0.05)
    trainees = _trainees(recipe)
    images, labels = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    train_step(trainees, build_model('resnet8x4').double().eval(), images, labels, recipe)
    stack = StudentStack(trainees, recipe)   # as after a resume
    key = 'classifier.weight'
    stacked = stack.optimizer.state[stack.params[key]]['momentum_buffer']
    for i, t in enumerate(trainees):
        param = dict(t.module.named_parameters())[key]
        assert torch.equal(stacked[i], t.optimizer.state[param]['momentum_buffer'])


def test_what_cannot_be_stacked_is_said():
    recipe = Recipe(epochs=1)
    cpu = torch.device('cpu')
    same = [Trainee(f's{i}', StudentNet(), 'ce', recipe, cpu) for i in range(2)]
    assert stacking_problem(same, False, False) is None
    assert 'single' in stacking_problem(same[:1], False, False)
    mixed = [same[0], Trainee('w', build_model('wrn_16_2'), 'ce', recipe, cpu)]
    assert 'architectures' in stacking_problem(mixed, False, False)
    assert 'torchrun' in stacking_problem(same, True, False)
    fp16 = [Trainee(f'h{i}', StudentNet(), 'ce', recipe, cpu, precision=torch.float16)
            for i in range(2)]
    assert 'fp16' in stacking_problem(fp16, False, False)


def test_timing_both_ways_leaves_the_students_untouched():
    recipe = Recipe(epochs=1)
    trainees = _trainees(recipe, dtype=torch.float32)
    before = [copy.deepcopy(t.module.state_dict()) for t in trainees]
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    seconds = time_both(trainees, recipe, build_model('resnet8x4').eval(), images, labels, None,
                        steps=1)
    assert set(seconds) == {'loop', 'stacked'} and all(v > 0 for v in seconds.values())
    for t, state in zip(trainees, before):
        assert all(torch.equal(v, state[k]) for k, v in t.module.state_dict().items())
