"""Test-time augmentation, as a recipe's tta sets it: 'flip_shift' evaluates 6 views (the fast
recipe's)."""
import torch
import torch.nn.functional as F


def tta_views(images):
    """The 6 views of `flip_shift` and their weights: [(weight, view)], views B x C x H x W.

    The image and its mirror (weight 1/4 each), and both of them translated by one pixel
    (reflect-padded) up-left and down-right (1/8 each), as in airbench94.
    """
    padded = F.pad(images, (1, 1, 1, 1), mode='reflect')
    h, w = images.shape[-2:]
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    views = []
    for weight, x in [(0.25, images)] + [(0.125, s) for s in shifted]:
        views += [(weight, x), (weight, x.flip(-1))]
    return views


def tta_view_count(recipe):
    """Forward passes per image of the recipe's test-time augmentation (1 without it)."""
    return 6 if recipe.tta == 'flip_shift' else 1


def tta_logits(forward, images):
    """(single-view logits, flip_shift logits): forward(x) -> logits; the TTA logits are the
    weighted mean of the 6 views' logits (tta_views), the single view is the first view."""
    single, total = None, 0.0
    for weight, view in tta_views(images):
        logits = forward(view.contiguous(memory_format=torch.channels_last)
                         if images.is_contiguous(memory_format=torch.channels_last) else view)
        single = logits if single is None else single
        total = total + weight * logits
    return single, total
