"""The methods' hyper-parameters as the reports name them: their order, symbols and labels.

The declarations live with the methods (kd.methods); the reports read them here only, so a
change in how the methods declare their settings touches this file alone.
"""
from kd.methods.losses import HYPER, HYPER_PARAMETERS


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
