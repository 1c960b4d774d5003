"""Lookahead weight averaging, as a recipe's lookahead_every, lookahead_decay and
lookahead_power set it (the fast recipe's)."""
import torch


def lookahead_decay_at(recipe, steps_done, total_steps):
    """The averaging decay after `steps_done` of `total_steps`: lookahead_decay *
    (steps_done / total_steps) ** lookahead_power (small early, when the weights move fast)."""
    return recipe.lookahead_decay * (steps_done / total_steps) ** recipe.lookahead_power


class Lookahead:
    """Lookahead weight averaging (Zhang et al., 2019, as airbench94 uses it).

    Keeps a slow copy of the module's floating-point state (weights and BatchNorm statistics).
    Every `lookahead_every` steps, update(decay) moves the slow copy towards the trained weights,
    slow = decay * slow + (1 - decay) * fast, and puts the slow copy back into the module
    (fast = slow); so does the last step (lookahead_step).
    """

    def __init__(self, module):
        self.slow = {k: v.detach().clone() for k, v in module.state_dict().items()
                     if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module, decay):
        for key, fast in module.state_dict().items():
            if key in self.slow:
                self.slow[key].lerp_(fast, 1 - decay)
                fast.copy_(self.slow[key])

    def state_dict(self):
        return {k: v.cpu().clone() for k, v in self.slow.items()}

    def load_state_dict(self, state):
        for k, v in state.items():
            self.slow[k].copy_(v)


def lookahead_step(lookahead, module, recipe, steps_done, total_steps):
    """The averaging due after `steps_done` steps (a count from 1), if any: every
    lookahead_every steps and after the last step, so the trained weights are the slow ones.
    (airbench94 instead copies the slow weights after the last step, dropping the steps since
    the last multiple of 5; here those steps are averaged in like any others.)"""
    if lookahead is not None and (steps_done % recipe.lookahead_every == 0
                                  or steps_done >= total_steps):
        lookahead.update(module, lookahead_decay_at(recipe, steps_done, total_steps))
