"""The benchmark scripts refuse bad usage as main.py does: exit 2, the message alone."""
import pytest

from conftest import run_bench


@pytest.mark.parametrize('script', ['bench.py', 'methods_bench.py', 'stack_bench.py'])
def test_a_bad_device_exits_2_with_the_message_alone(script):
    proc = run_bench(script, '--device', 'tpu', timeout=120)
    assert proc.returncode == 2
    assert "--device 'tpu' is not a device (use auto, cpu, cuda or cuda:N)" in proc.stderr
    assert 'Traceback' not in proc.stderr
