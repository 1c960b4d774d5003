"""The benchmark scripts refuse bad usage as main.py does: exit 2, the message alone."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize('script', ['methods_bench.py', 'stack_bench.py'])
def test_a_bad_device_exits_2_with_the_message_alone(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), '--device', 'tpu'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device 'tpu' is not a device (use auto, cpu, cuda or cuda:N)" in proc.stderr
    assert 'Traceback' not in proc.stderr
