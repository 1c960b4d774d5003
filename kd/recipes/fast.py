"""The fast recipe: the techniques of airbench94 (Jordan, "94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv 2404.00498): ten epochs of batch 1,024 with a patch-whitening first layer,
frozen BatchNorm scales, lookahead weight averaging and test-time augmentation."""
from kd.recipes.base import Recipe, register_recipe

# airbench94's hyper-parameters (arXiv 2404.00498, section 3 and its released configuration)
FAST = register_recipe(Recipe(
    name='fast', epochs=10, batch_size=1024, lr=11.5, lr_unit='per_1024', weight_decay=0.0153,
    momentum=0.85, schedule='triangular', triangle=(0.2, 0.23, 0.07), label_smoothing=0.2,
    bias_lr_scale=64.0, whiten_images=5000, whiten_bias_epochs=3, freeze_norm_scales=True,
    crop_padding=2,
    padding_mode='reflect', flip='alternate', lookahead_every=5, tta='flip_shift', select='last',
    test_every=0, teacher_arch='airbench94', student_arch='airbench94_small'))
