"""Decisions that only matter on a GPU, tested here with the hardware mocked: the precision per
GPU generation, fp16 with loss scaling, PyTorch's SyncBatchNorm on CUDA, cuDNN autotuning, fp32
logits under autocast, and a loader that copies its epoch plan to the device once."""
import pytest
import torch
import torch.nn as nn

from kd.engine import distributed
from kd.models import StudentNet, build_model, model_names
from kd.engine.precision import choose_precision, configure_backends
from kd.engine.step import train_step
from kd.engine.trainee import Trainee
from kd.recipes.base import Recipe
from kd.data.loader import CifarLoader

CUDA = torch.device('cuda')


def fake_bf16_support(native):
    """torch.cuda.is_bf16_supported of a GPU with (native) or without (emulated) bf16 units."""
    return lambda including_emulation=True: native or including_emulation


@pytest.mark.parametrize('native, expected', [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_uses_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', fake_bf16_support(native))
    for name in ('teacher', 'student_kd', 'student_base'):
        assert choose_precision(name, CUDA, None) == expected
        assert choose_precision(name, CUDA, True) == expected
        assert choose_precision(name, CUDA, False) is None


@pytest.mark.parametrize('capability, expected', [((7, 5), torch.float16),   # T4
                                                  ((7, 0), torch.float16),   # V100
                                                  ((8, 0), torch.bfloat16),  # A100
                                                  ((9, 0), torch.bfloat16)])  # H100
def test_older_pytorch_judges_bf16_by_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)  # no including_emulation
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert choose_precision('student_kd', CUDA, None) == expected


def test_fp16_trains_through_a_grad_scaler_that_skips_overflowing_steps():
    torch.manual_seed(0)
    cpu = torch.device('cpu')
    t = Trainee('student_base', StudentNet(), 'ce', Recipe(epochs=1), cpu, precision=torch.float16)
    assert isinstance(t.scaler, torch.amp.GradScaler)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = t.module.classifier.weight.detach().clone()
    (loss, *_), = train_step([t], None, images, labels, Recipe(epochs=1))
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(t.module.classifier.weight, before)   # a real step was taken
    # a scale that overflows: the scaler finds inf gradients, skips the step, halves the scale
    t.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 127)
    before = {k: v.clone() for k, v in t.module.state_dict().items() if v.is_floating_point()}
    train_step([t], None, images, labels, Recipe(epochs=1))
    assert t.scaler.get_scale() == 2.0 ** 126
    params = dict(t.module.named_parameters())
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_bf16_and_fp32_trainees_have_no_scaler():
    cpu = torch.device('cpu')
    for precision in (None, torch.bfloat16):
        assert Trainee('s', StudentNet(), 'ce', Recipe(), cpu, precision=precision).scaler is None


def test_pytorch_syncbatchnorm_on_cuda_and_ours_where_it_has_no_kernel():
    assert distributed.sync_batchnorm_kind(CUDA) is nn.SyncBatchNorm
    assert distributed.sync_batchnorm_kind('cpu') is distributed.SyncBatchNorm2d
    for device, kind in ((CUDA, nn.SyncBatchNorm), (torch.device('cpu'),
                                                     distributed.SyncBatchNorm2d)):
        model = StudentNet()
        params = {n: p for n, p in model.named_parameters()}
        keys = list(model.state_dict())
        converted = distributed.sync_batchnorm(model, device)
        bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(type(m) is kind for m in bns)
        assert list(converted.state_dict()) == keys   # checkpoints are unaffected
        # the very same parameter objects: an optimizer built before still holds them
        assert all(p is params[n] for n, p in converted.named_parameters())


def test_cudnn_autotuning_is_switched_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    configure_backends(torch.device('cpu'))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(CUDA)
    assert torch.backends.cudnn.benchmark is True


# bf16 autocast takes seconds a model for the large ones on a CPU without bf16 arithmetic: they
# run in the slow selection, the default one keeps the default pair and one of each family
AUTOCAST_SLOW = {'resnet50', 'resnet32x4', 'resnet110', 'vgg11', 'vgg13', 'vgg16', 'vgg19',
                 'wrn_40_2'}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in AUTOCAST_SLOW
                                  else n for n in model_names()])
def test_logits_are_float32_under_autocast(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.float32
    # not bf16 values stored as float32: the last layer ran in float32 on its features
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    features = []
    head.register_forward_hook(lambda m, inputs, out: features.append(inputs[0]))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(x)
    expected = nn.functional.linear(features[0].float(), head.weight, head.bias)
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, logits.bfloat16().float())


def test_the_epoch_plan_is_copied_to_the_device_once_not_per_batch(monkeypatch):
    n, batch = 200, 10
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    loader = CifarLoader(images, torch.arange(n) % 10, batch, train=True)
    calls = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, 'to', counting_to)
    batches = sum(1 for _ in loader)
    assert batches == 20
    assert len(calls) == 3     # order, offsets and flips, once for the whole epoch
    order, (offsets, flips) = loader._plan(0)
    assert {t.device for t in (order, offsets, flips)} == {loader.device}
