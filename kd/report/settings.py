"""The methods' settings as the reports read them: the hyper-parameters' order, symbols and
labels, and how long a loss ramps up.

The declarations live with the methods (kd.methods); the reports read them here only, so a
change in how the methods declare their settings touches this file alone.
"""
from kd.methods.losses import HYPER, HYPER_PARAMETERS, get_loss


def settings():
    """Every hyper-parameter a method can take, in the methods' order (the grid's axes follow
    it)."""
    return HYPER_PARAMETERS


def is_switch(key):
    """Whether `key` is an on/off setting (label smoothing's LS), not a number."""
    return HYPER[key].switch


def axis_label(key):
    """The setting's name on a heat map's axis, e.g. 'temperature T'."""
    return HYPER[key].label


def value_text(key, value):
    """A value of the setting as a heat map's tick shows it."""
    return HYPER[key].text(value)


def warmup_epochs(loss):
    """The epochs over which `loss` ramps its distillation weight up (0: none), or None for a
    loss this code does not know (one from another version of the code)."""
    try:
        return get_loss(loss).warmup_epochs
    except KeyError:
        return None
