"""Students of one architecture trained as one batched computation.

A grid of students shares every batch and the teacher's logits; what differs is only each
student's weights and loss. torch.func.vmap runs all of them as one computation over weights
stacked along a new first dimension (each student keeps its own BatchNorm statistics, stacked
the same way), which on a GPU replaces N small kernel launches per layer by one larger one.
Gradients stay separate (student i's loss depends on slice i only) and SGD is elementwise, so
one optimizer over the stacked tensors takes exactly each student's own step.

The trainees' modules and optimizers stay the reference copy: write_back() puts the stacked
weights, statistics and momentum into them before every evaluation and checkpoint, so
checkpoints, resume states and evaluation are those of the plain loop. A StudentStack is a
stepper (step.py): the caller hands the class to the loop, which builds it after restoring a
saved state, so the stack starts from that state.
"""
import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from kd.engine.step import train_step_stacked
from kd.recipes.optim import make_optimizer, param_groups, set_learning_rates


class StudentStack:
    def __init__(self, trainees, recipe):
        self.trainees, self.recipe = trainees, recipe
        modules = [t.module for t in trainees]
        # the architecture without storage: functional_call supplies the stacked tensors
        self.skeleton = copy.deepcopy(modules[0]).to('meta')
        self.params, self.buffers = stack_module_state(modules)
        # the recipe's one parameter group (stacking_problem refuses recipes with several),
        # over the stacked tensors
        group, = param_groups(modules[0], recipe)
        self.optimizer = make_optimizer([dict(group, params=list(self.params.values()))], recipe)
        self._load_momentum()

    def _load_momentum(self):
        """Stack the trainees' momentum buffers (after a resume) into the stacked optimizer."""
        for key, stacked in self.params.items():
            buffers = []
            for t in self.trainees:
                param = dict(t.module.named_parameters())[key]
                buffers.append(t.optimizer.state.get(param, {}).get('momentum_buffer'))
            if all(b is not None for b in buffers):
                self.optimizer.state[stacked]['momentum_buffer'] = torch.stack(buffers)

    def _one(self, params, buffers, images):
        return functional_call(self.skeleton, (params, buffers), (images,))

    def forward(self, images):
        """Logits of every student, N x batch x classes."""
        return vmap(self._one, in_dims=(0, 0, None))(self.params, self.buffers, images)

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def step(self, batch, epoch, step, steps_per_epoch, teacher):
        """One stacked step on `batch` (as step.LockstepSteps.step). Returns (the learning
        rate, a StepResult per trainee)."""
        lr = set_learning_rates(self.optimizer, self.recipe, step, steps_per_epoch)
        return lr, train_step_stacked(self, teacher.model, batch.images, batch.labels,
                                      teacher.precision, epoch=epoch + 1)

    @torch.no_grad()
    def write_back(self):
        """Copy the stacked weights, BatchNorm statistics and momentum into each trainee."""
        for i, t in enumerate(self.trainees):
            params = dict(t.module.named_parameters())
            buffers = dict(t.module.named_buffers())
            for key, stacked in self.params.items():
                params[key].copy_(stacked[i])
                momentum = self.optimizer.state.get(stacked, {}).get('momentum_buffer')
                if momentum is not None:
                    t.optimizer.state[params[key]]['momentum_buffer'] = momentum[i].clone()
            for key, stacked in self.buffers.items():
                buffers[key].copy_(stacked[i])


def stacking_problem(trainees, multi_process, compiled):
    """Why these trainees cannot be stacked, or None when they can."""
    if len(trainees) < 2:
        return 'a single student'
    if any(t.distiller is not None for t in trainees):
        return 'feature distillers (each reads its own features and trains its own parameters)'
    if len({type(t.module) for t in trainees}) > 1 or \
            len({tuple((k, v.shape) for k, v in t.module.state_dict().items())
                 for t in trainees}) > 1:
        return 'students of different architectures'
    if len({t.precision for t in trainees}) > 1:
        return 'students in different precisions'
    if any(t.scaler is not None for t in trainees):
        return 'fp16 loss scaling (one scaler per student would skip steps separately)'
    if any(t.lookahead is not None for t in trainees):
        return 'the recipe\'s lookahead averaging (applied per student in the loop)'
    if any(len(t.optimizer.param_groups) > 1 for t in trainees):
        return 'the recipe\'s parameter groups'
    if multi_process:
        return 'torchrun (DDP wraps each student)'
    if compiled:
        return '--compile'
    return None
