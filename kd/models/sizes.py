"""Which image sizes the registered models run at, checked before a run trains.

Every registered model pools its last feature map globally before the classifier (adaptive
pooling), so one network runs at any height and width, with the same parameters: a checkpoint
trained at 32x32 loads at 64x64. What bounds the size from below is the downsampling: a model
registers `min_size`, the smallest side at which its last stage still sees at least one real pixel
(the product of its strides and pooling factors: 4 for the CIFAR ResNets and WRNs, 8 for
ResNet-18/50, the plain CNN, VGG and ShuffleNets, 16 for MobileNetV2, 9 for airbench's 2x2
whitening and three max-pools). Padding would let some of them run on smaller images, on maps of
padding rather than of the image, so they refuse instead.

A model that is not registered (torchvision:, timm:, a user's file) declares no size: it is
tried instead, one forward of two blank images in eval mode, and what its forward raises becomes
the one-line reason (Inception v3 on 32x32 images, say).
"""
import torch

from kd.models.external import is_external
from kd.models.registry import MIN_SIZE, build_model


def image_size_problem(arch, image_shape, num_classes=10):
    """Why model `arch` cannot run on images of image_shape (C, H, W), in one line naming the
    size; None when it can. A registered model is judged by its declared smallest size, any
    other (torchvision:, timm:, a file's class) by a forward at that size."""
    height, width = image_shape[-2:]
    smallest = MIN_SIZE.get(arch)
    if smallest is not None and min(height, width) < smallest:
        return (f'model {arch!r} cannot run on {height}x{width} images: its downsampling needs '
                f'at least {smallest}x{smallest}')
    if smallest is None and is_external(arch):
        failure = _forward_failure(build_model(arch, num_classes), image_shape)
        if failure:
            return f'model {arch!r} cannot run on {height}x{width} images: {failure}'
    return None


def _forward_failure(model, image_shape):
    """The first line of what a forward of two blank images raises, or None when it runs."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *image_shape))
    except (RuntimeError, ValueError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def check_image_size(arch, image_shape):
    """Raise ValueError (image_size_problem's line) when registered model `arch` cannot run on
    images of image_shape (C, H, W); call it for every model of a run before training."""
    problem = image_size_problem(arch, image_shape)
    if problem is not None:
        raise ValueError(problem)
