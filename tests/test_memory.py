"""The memory a grid needs, refused before training when it cannot fit; the peak, recorded."""
import json
import os

import pytest
import torch

import memory
from models import build_model, count_parameters
from runner import ModelSpec


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
