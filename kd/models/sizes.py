"""Which image sizes the registered models run at, checked before a run trains.

Every registered model pools its last feature map globally before the classifier (adaptive
pooling), so one network runs at any height and width, with the same parameters: a checkpoint
trained at 32x32 loads at 64x64. What bounds the size from below is the downsampling: a model
registers `min_size`, the smallest side at which its last stage still sees at least one real pixel
(the product of its strides and pooling factors: 4 for the CIFAR ResNets and WRNs, 8 for
ResNet-18/50, the plain CNN, VGG and ShuffleNets, 16 for MobileNetV2, 9 for airbench's 2x2
whitening and three max-pools). Padding would let some of them run on smaller images, on maps of
padding rather than of the image, so they refuse instead.

Models that are not registered here (torchvision:, timm:, a user's file) are not checked: their
own forward says what they accept.
"""
from kd.models.registry import MIN_SIZE


def image_size_problem(arch, image_shape):
    """Why registered model `arch` cannot run on images of image_shape (C, H, W), in one line
    naming the size; None when it can (or when `arch` is not a registered model)."""
    smallest = MIN_SIZE.get(arch)
    height, width = image_shape[-2:]
    if smallest is None or min(height, width) >= smallest:
        return None
    return (f'model {arch!r} cannot run on {height}x{width} images: its downsampling needs at '
            f'least {smallest}x{smallest}')


def check_image_size(arch, image_shape):
    """Raise ValueError (image_size_problem's line) when registered model `arch` cannot run on
    images of image_shape (C, H, W); call it for every model of a run before training."""
    problem = image_size_problem(arch, image_shape)
    if problem is not None:
        raise ValueError(problem)
