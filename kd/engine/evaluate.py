"""Evaluation: logits and labels of a non-augmenting loader (gathered over torchrun ranks),
with or without test-time augmentation, and top-1 accuracy."""
import torch
from tqdm import tqdm

from kd.engine.distributed import all_gather_cat
from kd.engine.precision import autocast
from kd.recipes.tta import tta_logits


@torch.inference_mode()
def predict(model, loader, precision=None, progress=None):
    """(float32 logits, labels) for every image of a non-augmenting loader, in dataset order.

    A loader sharded over torchrun processes gives each rank a slice of every batch; the
    slices are gathered and put back in dataset order, so every rank gets every image and the
    result equals the single-process one. progress: a description for a progress bar over the
    batches (stderr, removed when done, shown on a terminal only), or None for no bar.
    """
    logits, _, labels = predict_views(model, loader, precision, tta=False, progress=progress)
    return logits, labels


@torch.inference_mode()
def predict_views(model, loader, precision=None, tta=True, progress=None):
    """(single-view logits, test-time-augmented logits or None, labels), float32, for every
    image of a non-augmenting loader in dataset order (as predict, progress as there). tta:
    average the 6 views of recipe.tta_logits; the single view is one of them, so it costs
    nothing more."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []

    def forward(x):
        with autocast(x.device, precision):
            return model(x).float()

    batches = loader if progress is None else tqdm(loader, desc=progress, leave=False,
                                                   disable=None)
    for images, y in batches:
        outputs.append(tta_logits(forward, images) if tta else (forward(images), None))
        labels.append(y)
    model.train(was_training)
    logits, labels = torch.cat([o[0] for o in outputs]), torch.cat(labels)
    averaged = torch.cat([o[1] for o in outputs]) if tta else None
    if getattr(loader, 'world_size', 1) > 1:
        order = all_gather_cat(loader.rank_indices())
        logits, labels = all_gather_cat(logits), all_gather_cat(labels)
        logits[order], labels[order] = logits.clone(), labels.clone()
        if averaged is not None:
            averaged = all_gather_cat(averaged)
            averaged[order] = averaged.clone()
    return logits, averaged, labels


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).sum().item() / max(1, len(labels))


def evaluate(model, loader, precision=None):
    """Top-1 accuracy in percent."""
    return accuracy(*predict(model, loader, precision))
