"""bench/gpu_check.sh on a machine without a GPU: its usage, its refusals, and that the project's
files speak to its users only. Each test takes well under a second."""
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'bench', 'gpu_check.sh')
USAGE = ('Usage: bash bench/gpu_check.sh [--data-dir DIR] [--out DIR] [--epochs N] '
         '[--deadline SECONDS]')

pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')


def run_script(*args, env=None, cwd=None, timeout=60):
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def test_syntax():
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_shellcheck():
    r = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_usage_with_defaults(flag, tmp_path):
    r = run_script(flag, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(USAGE)
    for default in ('(default: ./data)', '(default: ./gpu_check_out)', '(default: 15)',
                    '(default: 480)'):
        assert default in r.stdout
    assert 'PYTHON' in r.stdout
    assert not (tmp_path / 'gpu_check_out').exists()  # --help writes nothing


@pytest.mark.parametrize('args', [['--bogus'], ['extra'], ['--epochs'], ['--epochs', '0'],
                                  ['--epochs', 'x'], ['--deadline=-5'], ['--out', '']])
def test_bad_usage_exits_2_with_one_line(args, tmp_path):
    r = run_script(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ''
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'gpu_check_out').exists()


def test_unknown_option_names_it(tmp_path):
    r = run_script('--frobnicate', cwd=tmp_path)
    assert r.returncode == 2
    assert '--frobnicate' in r.stderr


@pytest.fixture
def no_cuda_env(tmp_path):
    """PATH and PYTHON leading to a python whose torch says there is no CUDA, and an nvidia-smi
    that finds no device."""
    site = tmp_path / 'fake_site' / 'torch'
    site.mkdir(parents=True)
    (site / '__init__.py').write_text(
        "__version__ = '0.0+fake'\n"
        "class version:\n    cuda = None\n"
        "class cuda:\n    @staticmethod\n    def is_available():\n        return False\n")
    bin_dir = tmp_path / 'fake_bin'
    bin_dir.mkdir()
    python = bin_dir / 'python'
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site.parent}" exec "{sys.executable}" "$@"\n')
    (bin_dir / 'nvidia-smi').write_text('#!/bin/sh\necho "No devices were found"\nexit 6\n')
    for f in (python, bin_dir / 'nvidia-smi'):
        f.chmod(0o755)
    (bin_dir / 'python3').symlink_to(python)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}',
               PYTHON=str(python))
    env.pop('PYTHONPATH', None)
    return env


@pytest.mark.parametrize('explicit_out', [True, False])
def test_no_cuda_gpu_exits_1_quickly_with_a_log(no_cuda_env, tmp_path, explicit_out):
    work = tmp_path / 'work'
    work.mkdir()
    out = tmp_path / 'out' if explicit_out else work / 'gpu_check_out'  # default: ./gpu_check_out
    args = ['--out', str(out)] if explicit_out else []
    t0 = time.time()
    r = run_script(*args, '--data-dir', str(tmp_path / 'no_data'), env=no_cuda_env, cwd=work)
    seconds = time.time() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert seconds < 10
    assert 'no cuda gpu was found' in r.stdout.lower()
    log = (out / 'gpu_check.log').read_text()
    assert 'no cuda gpu was found' in log.lower()
    assert 'No devices were found' in log  # nvidia-smi's output, logged and reported
    assert 'FAILED rc=6' in log
    # it stops before the data, the benchmark and the training runs
    assert sorted(p.name for p in out.iterdir()) == ['gpu_check.log']
    assert not (tmp_path / 'no_data').exists()
