"""Shared fixtures: tiny CIFAR-10 folders in the real pickle format, and a CLI runner."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_cifar(folder, train_per_batch=40, test_size=100, seed=0):
    """Write data_batch_1..5 and test_batch as the python release does (uint8 N x 3072).

    Each class has its own mean colour, so a model can learn something in a few steps.
    """
    rng = np.random.default_rng(seed)
    out = os.path.join(folder, 'cifar-10-batches-py')
    os.makedirs(out, exist_ok=True)

    def batch(n, label):
        labels = rng.integers(0, 10, n)
        colours = (np.arange(10)[:, None] * np.array([25, 60, 95]) % 256).astype(np.float64)
        images = colours[labels][:, :, None, None] + rng.normal(0, 40, (n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {'batch_label': label, 'labels': [int(x) for x in labels], 'data': data,
                'filenames': [f'img_{i}.png' for i in range(n)]}

    for i in range(1, 6):
        with open(os.path.join(out, f'data_batch_{i}'), 'wb') as f:
            pickle.dump(batch(train_per_batch, f'training batch {i} of 5'), f, protocol=2)
    with open(os.path.join(out, 'test_batch'), 'wb') as f:
        pickle.dump(batch(test_size, 'testing batch 1 of 1'), f, protocol=2)
    with open(os.path.join(out, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': ['c%d' % i for i in range(10)]}, f, protocol=2)
    return folder


def pytest_configure(config):
    """Under pytest-xdist (-n N), each worker's in-process torch gets its share of the cores:
    N workers each running a pool of every core would spin against one another."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope='session', autouse=True)
def precision_cache(tmp_path_factory):
    """The stored CPU precision decisions go to a folder of the test session, never the user's
    cache; every run of the session shares it (measured once, as on a user's machine), the
    parallel workers' included: their folders have the session's folder as parent."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        folder = str(tmp_path_factory.getbasetemp().parent / 'shared_cache')
    else:
        folder = str(tmp_path_factory.mktemp('cache'))
    previous = os.environ.get('KD_CIFAR_CACHE_DIR')
    os.environ['KD_CIFAR_CACHE_DIR'] = folder
    yield folder
    if previous is None:
        del os.environ['KD_CIFAR_CACHE_DIR']
    else:
        os.environ['KD_CIFAR_CACHE_DIR'] = previous


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    """A data root with 200 training and 100 test images (read-only for tests: copy to change)."""
    return write_cifar(str(tmp_path_factory.mktemp('cifar')))


def run_cli(*args, cwd=None, timeout=600, env=None):
    """python main.py ARGS in a subprocess; returns the CompletedProcess (text, both streams)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    full_env.setdefault('OMP_NUM_THREADS', '1')  # 2 shared cores: torch's thread pool would spin
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def snapshot(folder):
    """{relative path: bytes} of every file under folder: to prove nothing changed."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope='session')
def trained_run(cifar_dir, tmp_path_factory):
    """One teacher run then one students run on the tiny data (read-only: copy to change)."""
    out = str(tmp_path_factory.mktemp('run'))
    common = ['--data-dir', cifar_dir, '--out-dir', out, '--batch-size', '32', '--device', 'cpu']
    teacher = run_cli('--train-teacher', '--epochs', '1', '--subset', '100', *common)
    assert teacher.returncode == 0, teacher.stderr
    students = run_cli('--epochs', '2', '--subset', '100', *common)
    assert students.returncode == 0, students.stderr
    return {'out': out, 'teacher': teacher, 'students': students, 'common': common}


def run_bench(script, *args, timeout=300, env=None):
    """python bench/SCRIPT ARGS in a subprocess on one thread; returns the CompletedProcess.
    The environment is read at the call, so the session's precision cache applies."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_cifar100(folder, train_size=200, test_size=100, seed=0):
    """Write train, test and meta as CIFAR-100's python release does (uint8 N x 3072).

    Like write_cifar: each of the 100 fine classes has its own mean colour; coarse labels are
    fine // 5 (not the real grouping, which nothing here reads).
    """
    rng = np.random.default_rng(seed)
    out = os.path.join(folder, 'cifar-100-python')
    os.makedirs(out, exist_ok=True)

    def batch(n, label):
        labels = rng.integers(0, 100, n)
        colours = (np.arange(100)[:, None] * np.array([25, 60, 95]) % 256).astype(np.float64)
        images = colours[labels][:, :, None, None] + rng.normal(0, 40, (n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {'filenames': [f'img_{i}.png' for i in range(n)], 'batch_label': label,
                'fine_labels': [int(x) for x in labels],
                'coarse_labels': [int(x) // 5 for x in labels], 'data': data}

    with open(os.path.join(out, 'train'), 'wb') as f:
        pickle.dump(batch(train_size, 'training batch 1 of 1'), f, protocol=2)
    with open(os.path.join(out, 'test'), 'wb') as f:
        pickle.dump(batch(test_size, 'testing batch 1 of 1'), f, protocol=2)
    with open(os.path.join(out, 'meta'), 'wb') as f:
        pickle.dump({'fine_label_names': ['f%d' % i for i in range(100)],
                     'coarse_label_names': ['c%d' % i for i in range(20)]}, f, protocol=2)
    return folder
