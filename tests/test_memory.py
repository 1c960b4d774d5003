"""The memory a grid needs, refused before training when it cannot fit; the peak, recorded."""
import json
import os

import pytest
import torch

from kd.run import memory
from kd.models import build_model, count_parameters
from kd.run.specs import ModelSpec


def test_a_students_estimate_counts_weights_gradients_momentum_and_activations():
    shape = (128, 3, 32, 32)
    per_student = memory.bytes_per_student('cnn', 10, shape)
    params = count_parameters(build_model('cnn'))
    assert per_student > 3 * 4 * params
    # activations grow with the batch; the parameters' share does not
    assert memory.bytes_per_student('cnn', 10, (256, 3, 32, 32)) - per_student == \
        per_student - 3 * 4 * params


def test_a_grid_that_cannot_fit_is_refused_with_how_many_fit(monkeypatch):
    shape = (128, 3, 32, 32)
    per_student = memory.bytes_per_student('cnn', 10, shape)
    monkeypatch.setattr(memory, 'available_bytes', lambda device: 5 * per_student)
    specs = [ModelSpec(f's{i}', 'cnn', 'kd', {}) for i in range(16)]
    lines = []
    with pytest.raises(memory.GridTooLarge, match=r'16 models of cnn .* holds about 4\b'):
        memory.check_memory(specs, torch.device('cpu'), 10, shape, lines.append)
    assert lines and 'MB per model' in lines[0]
    # four fit: no refusal, and the estimate is returned
    assert memory.check_memory(specs[:4], torch.device('cpu'), 10, shape, lines.append) == \
        4 * per_student


def test_the_peak_is_measured_and_recorded(trained_run):
    assert memory.peak_memory_mb(torch.device('cpu')) > 0
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        phases = json.load(f)['phases']
    for phase in ('teacher', 'students'):
        assert phases[phase]['peak_memory_mb'] > 0
        assert phases[phase]['config']['memory_estimate_mb'] > 0
    assert 'peak memory' in trained_run['students'].stdout


def test_feature_methods_add_their_connectors_and_memories():
    """crd holds two N x 128 memories and its embeddings; fitnet its regressor: the check
    counts them beside the networks."""
    from kd.methods.plan import plan_features
    from kd.models import StudentNet, TeacherNet, feature_points
    teacher = TeacherNet().eval()
    specs = [ModelSpec(loss, 'cnn', loss, {}) for loss in ('kd', 'fitnet', 'crd')]
    plan = plan_features([(s.arch, s.loss, StudentNet()) for s in specs], teacher,
                         feature_points('resnet18', teacher), 'cpu', 10, 'resnet18')
    labels = torch.arange(1000) % 10
    extra = {s.name: plan.state_bytes(s.loss, s.params, s.arch, labels) for s in specs}
    crd = plan.build('crd', {}, 'cnn', labels)
    assert extra['kd'] == 0
    # memories, Z, the labels by index (int64), and the embeddings' weights three times
    assert extra['crd'] == 2 * 1000 * 128 * 4 + 8 + 1000 * 8 + 3 * 4 * sum(
        p.numel() for p in crd.parameters())
    fitnet = plan.build('fitnet', {}, 'cnn', labels)
    assert extra['fitnet'] == 3 * 4 * sum(p.numel() for p in fitnet.parameters()) + \
        sum(b.numel() * b.element_size() for b in fitnet.buffers())
    shape = (128, 3, 32, 32)
    lines = []
    need = memory.check_memory(specs, torch.device('cpu'), 10, shape, lines.append, extra)
    assert need == 3 * memory.bytes_per_student('cnn', 10, shape) + sum(extra.values())
    assert "with their methods'" in lines[0]
