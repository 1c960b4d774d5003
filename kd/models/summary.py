"""Sizes of the registered models: parameters, multiply-accumulates, and the README's model table."""
import torch
import torch.nn as nn

from kd.models.registry import MODELS, build_model

# The image the registered models are defined for (CIFAR's, channels x height x width): the
# README table's size and count_macs' default. A run on another dataset passes its own.
MODEL_IMAGE = (3, 32, 32)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, input_size=(1, *MODEL_IMAGE)):
    """Multiply-accumulates per image of the convolutions and linear layers for one forward
    pass on a batch of input_size (N x C x H x W: the dataset's batch_shape)."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels/groups * kh * kw
            macs.append(output.numel() * k)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return sum(macs) // input_size[0]


def model_table(names=None, image_shape=MODEL_IMAGE):
    """The README's model table, in Markdown: every registered model (or those in `names`) with
    its parameters at 10 and 100 classes, its multiply-accumulates per image of image_shape
    (C x H x W, stated in the header; 10 classes) and the first paragraph of its docstring; the
    default pair first, then by name."""
    size = 'x'.join(str(d) for d in image_shape[1:])
    lines = ['| model (`--teacher-arch` / `--student-arch`) | parameters, 10 classes | 100 classes '
             f'| multiply-accumulates per {size} image | what it is |', '|---|---:|---:|---:|---|']
    for name in sorted(names or MODELS,
                       key=lambda n: (n not in ('resnet18', 'cnn'), n != 'resnet18', n)):
        doc = ' '.join((MODELS[name].__doc__ or '').strip().split('\n\n')[0].split())
        macs = count_macs(build_model(name, 10), (1, *image_shape))
        lines.append(f'| `{name}` | {count_parameters(build_model(name, 10)):,} | '
                     f'{count_parameters(build_model(name, 100)):,} | {macs / 1e6:,.1f} M | {doc} |')
    return '\n'.join(lines)
