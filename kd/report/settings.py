"""The methods' settings as the reports read them: the hyper-parameters' order, symbols and
labels, and how long a loss ramps up.

The declarations live with the methods (kd.methods); the reports read them here only, so a
change in how the methods declare their settings touches this file alone.
"""
from kd.methods.registry import HYPER, HYPER_PARAMETERS, get_loss


def settings():
    """Every hyper-parameter a method can take, in the methods' order (the grid's axes follow
    it)."""
    return HYPER_PARAMETERS


def is_switch(key):
    """Whether `key` is an on/off setting (label smoothing's LS), not a number; a method's own
    setting (declared with the method, not a shared knob) is a number."""
    return key in HYPER and HYPER[key].switch


def _declared(key, loss):
    """The HyperParameter of `key`: a shared knob's, else the one `loss` declares (None for a
    loss or setting this code does not know)."""
    if key in HYPER:
        return HYPER[key]
    try:
        return get_loss(loss).setting(key)
    except (KeyError, TypeError):
        return None


def axis_label(key, loss=None):
    """The setting's name on a heat map's axis, e.g. 'temperature T', 'warm-up epochs w'
    (a method's own setting, declared with `loss`)."""
    h = _declared(key, loss)
    return key if h is None else h.label


def value_text(key, value, loss=None):
    """A value of the setting as a heat map's tick shows it."""
    h = _declared(key, loss)
    return f'{value:g}' if h is None and isinstance(value, (int, float)) else \
        str(value) if h is None else h.text(value)


def warmup_epochs(loss, params=({},)):
    """The epochs over which `loss` ramps its distillation weight up (0: none), the longest over
    the settings `params` it ran with (a 'warmup' setting may change it), or None for a loss this
    code does not know (one from another version of the code)."""
    try:
        spec = get_loss(loss)
    except KeyError:
        return None
    return max(spec.warmup_for(p or {}) for p in params)
