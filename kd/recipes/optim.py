"""A recipe's optimizer and learning-rate schedule: the one place an optimizer is built, for the
plain loop, stacked students and torchrun alike."""
import math

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------
# The optimizer and its parameter groups

def _whitening_bias(module):
    layer = getattr(module, 'whiten', None)
    return layer.bias if isinstance(layer, torch.nn.Conv2d) and layer.bias is not None else None


def param_groups(module, recipe):
    """SGD's parameter groups for `module` under `recipe`: [{'params', 'lr', 'weight_decay',
    'base_lr', 'group'}], trainable parameters only.

    lr_unit 'batch': one group, lr and weight decay as given. lr_unit 'per_1024' (airbench's):
    with m the momentum and B the batch, a step moves a parameter by lr / (1024 * (1 + 1/(1-m)))
    per image's gradient (the batch-mean gradient's SGD learning rate is that times B), and
    shrinks it by weight_decay * B / (1024 * (1 + 1/(1-m))) of itself, whatever its group
    (constant gradients under Nesterov momentum make steps 1 + 1/(1-m) times the gradient, so
    the factor keeps the step size independent of m). Three groups then: 'whitening_bias' and
    'norm_bias' (biases of BatchNorm layers whose scale is frozen) at bias_lr_scale times the lr,
    and 'other'.
    """
    if recipe.lr_unit == 'batch':  # every parameter, as SGD(module.parameters(), ...) takes them
        return [{'params': list(module.parameters()), 'lr': recipe.lr,
                 'weight_decay': recipe.weight_decay, 'base_lr': recipe.lr, 'group': 'all'}]
    scale = 1024 * (1 + 1 / (1 - recipe.momentum))
    lr = recipe.lr * recipe.batch_size / scale
    decay_per_step = recipe.weight_decay * recipe.batch_size / scale
    whitening_bias = _whitening_bias(module)
    norm_biases = [m.bias for m in module.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine
                   and not m.weight.requires_grad and m.bias.requires_grad]
    special = {id(p) for p in norm_biases} | ({id(whitening_bias)} if whitening_bias is not None
                                              else set())
    other = [p for p in module.parameters() if p.requires_grad and id(p) not in special]
    groups = []
    for name, params, group_lr in (
            ('whitening_bias', [whitening_bias] if whitening_bias is not None
             and whitening_bias.requires_grad else [], lr * recipe.bias_lr_scale),
            ('norm_bias', norm_biases, lr * recipe.bias_lr_scale), ('other', other, lr)):
        if params:
            groups.append({'params': params, 'lr': group_lr,
                           'weight_decay': decay_per_step / group_lr if group_lr else 0.0,
                           'base_lr': group_lr, 'group': name})
    return groups


def make_optimizer(module, recipe, extra=()):
    """The recipe's optimizer, Nesterov SGD with its momentum: the one place an optimizer is
    built, for the plain loop, stacked students and torchrun alike.

    module: an nn.Module, whose groups are `param_groups(module, recipe)`, or a list of such
    groups already made (stacked students give their stacked tensors). extra: more parameters
    (a feature method's connectors), in the main group ('all' or 'other', the last) with its lr
    and weight decay, as the reference code trains them (one SGD over the student and the
    method's modules); those not requiring a gradient are left out.
    """
    groups = param_groups(module, recipe) if isinstance(module, torch.nn.Module) \
        else [dict(g) for g in module]
    extra = [p for p in extra if p.requires_grad]
    if extra:
        groups[-1]['params'] = list(groups[-1]['params']) + extra
    return torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=recipe.nesterov)


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule

def warmup_steps(recipe, steps_per_epoch):
    """warmup_fraction of all steps, but at least one epoch (at most a fifth of the run).

    Short runs would otherwise jump to the peak lr within a step or two, which made both
    networks diverge in 3-epoch runs on 2,000 images.
    """
    total = recipe.epochs * steps_per_epoch
    return max(1, round(max(recipe.warmup_fraction * total, min(steps_per_epoch, 0.2 * total))))


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warm-up to peak_lr over warmup_steps, then cosine to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def triangular_factor(step, total_steps, start=0.2, peak_at=0.23, end=0.07):
    """The triangular schedule's factor at 0-based `step` of `total_steps`: `start` at step 0,
    1 at step int(peak_at * total_steps), `end` at step total_steps, linear in between."""
    peak = max(1, int(peak_at * total_steps))
    return float(np.interp(step, [0, peak, max(peak + 1, total_steps)], [start, 1.0, end]))


def learning_rate(recipe, group_base_lr, step, steps_per_epoch):
    """A group's learning rate at 0-based `step` (steps_per_epoch steps per epoch)."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == 'warmup_cosine':
        return lr_at(step, total, warmup_steps(recipe, steps_per_epoch), group_base_lr)
    if recipe.schedule == 'multistep':
        epoch = step // steps_per_epoch
        return group_base_lr * recipe.lr_decay ** sum(epoch >= m for m in recipe.milestones)
    return group_base_lr * triangular_factor(step, total, *recipe.triangle)


def set_learning_rates(optimizer, recipe, step, steps_per_epoch):
    """Set every group's lr for 0-based `step`; the whitening bias stops after
    whiten_bias_epochs. Returns the lr of the last group (the weights'), for the logs."""
    lr = None
    for group in optimizer.param_groups:
        base = group.get('base_lr', recipe.lr)
        if group.get('group') == 'whitening_bias' and \
                step >= recipe.whiten_bias_epochs * steps_per_epoch:
            group['lr'] = 0.0
        else:
            group['lr'] = learning_rate(recipe, base, step, steps_per_epoch)
        lr = group['lr']
    return lr
