"""The grid of settings a command line asks for: the shared flags' values (--temperature,
--alpha, --beta, --gamma, --logit-standardization) and `--set METHOD.NAME=VALUE[,VALUE...]`
(`SetValues`), expanded per method into settings (loss name, params), and their names
('kd_T4_a0.1', 'dkd_T4_w10') and command-line arguments, all from the methods' declarations
(registry.py)."""
import itertools
from typing import NamedTuple

from kd.methods.registry import HYPER, LOSSES, SWITCH, get_loss

SET_SYNTAX = 'METHOD.NAME=VALUE[,VALUE...]'


class SetValues(NamedTuple):
    """One --set: a method's declared setting and its values (typed, in the order given)."""
    method: str
    name: str
    values: tuple

    def arg(self):
        """The --set argument that gives these values back exactly: 'fitnet.beta=50.0,100.0'."""
        h = get_loss(self.method).setting(self.name)
        return f'{self.method}.{self.name}=' + ','.join(h.arg(v) for v in self.values)


def parse_set(text):
    """The SetValues of one --set argument 'METHOD.NAME=V1,V2'; ValueError, one sentence naming
    the argument and the problem (the syntax, an unknown method or setting, a value of the
    wrong type or out of range, a repeated value)."""
    head, eq, tail = text.partition('=')
    method, dot, name = head.strip().partition('.')
    if not (eq and dot and method and name and tail.strip()):
        raise ValueError(f'--set takes {SET_SYNTAX} (e.g. fitnet.beta=50,100), got {text!r}')
    if method not in LOSSES:
        raise ValueError(f'--set {text}: unknown method {method!r}; known methods: '
                         f'{", ".join(n for n in LOSSES if n != "ce")}')
    try:
        h = get_loss(method).setting(name)
    except KeyError as e:
        raise ValueError(f'--set {text}: {e.args[0]}') from None
    try:
        values = tuple(h.check(v.strip()) for v in tail.split(','))
    except ValueError as e:
        raise ValueError(f'--set {text}: {e}') from None
    if len(set(values)) != len(values):
        raise ValueError(f'--set {text}: a value is repeated')
    return SetValues(method, name, values)


def parse_sets(texts):
    """The SetValues of every --set argument, in order; ValueError as parse_set, or for a
    setting given twice."""
    out = [parse_set(t) for t in texts or ()]
    seen = set()
    for s in out:
        if (s.method, s.name) in seen:
            raise ValueError(f'--set {s.method}.{s.name} is given twice; give its values once, '
                             f'separated by commas')
        seen.add((s.method, s.name))
    return tuple(out)


def _check_values(key, values):
    """The values of shared knob `key`, typed; ValueError naming the bad one."""
    values = list(values)
    if not values:
        raise ValueError(f'no value given for {key}')
    return [HYPER[key].check(v) for v in values]


def expand_grid(loss_names, temperatures=None, alphas=None, betas=None, gammas=None,
                logit_standardization=None, sets=()):
    """[(loss_name, params)]: for each loss in order, every combination of the given values of
    the settings it takes, duplicates removed, order stable (loss, then logit standardisation
    off before on, then its grid axes in declared order: temperature, alpha, beta, gamma, its
    own; then the constants given by --set). `sets` (SetValues) give a method's values of one
    of its settings, over the shared flag's; where neither gives values, the default. Values
    for a knob a loss does not take are ignored. A constant (axis=False) enters params only
    where it differs from its default. With logit standardisation on, the loss's LS defaults
    apply (kd, dkd: T 2) and params hold 'logit_standardization': True; off, params do not name
    it. Unknown names raise KeyError, before anything is built."""
    specs = [get_loss(name) for name in loss_names]
    given = {'temperature': temperatures, 'alpha': alphas, 'beta': betas, 'gamma': gammas,
             SWITCH: logit_standardization}
    checked = {k: None if v is None else _check_values(k, v) for k, v in given.items()}
    chosen = {(s.method, s.name): list(s.values) for s in sets or ()}
    out = []
    for spec in specs:
        for item in _settings_of(spec, checked, chosen):
            if item not in out:
                out.append(item)
    return out


def _settings_of(spec, checked, chosen):
    """The (name, params) of one loss's grid (expand_grid's)."""

    def values(key):
        own = chosen.get((spec.name, key))
        return own if own is not None else checked.get(key)

    constants = [k for k, h in spec.settings.items()
                 if not h.axis and (spec.name, k) in chosen]
    for on in sorted(set((values(SWITCH) if spec.takes_ls else None) or [False])):
        defaults = spec.defaults_for(on)
        keys = [k for k in defaults if k != SWITCH]
        axes = [values(k) if values(k) is not None else [defaults[k]] for k in keys]
        axes += [chosen[(spec.name, k)] for k in constants]
        for combo in itertools.product(*axes):
            params = dict(zip(keys, combo[:len(keys)]))
            params.update({k: v for k, v in zip(constants, combo[len(keys):])
                           if v != spec.settings[k].default})
            if on:
                params[SWITCH] = True
            yield spec.name, params


def setting_name(loss_name, params):
    """A short name for one setting, e.g. 'kd_T4_a0.1', 'dkd_T4', 'ls_T2_a0.1', 'ce',
    'dkd_T2_ls' (logit standardisation on), 'rkd_b25_g50', 'dkd_T4_w10' (a constant away from
    its default).

    The loss's grid axes appear (a missing one shows its default), then its constants that
    differ from their defaults, each as its symbol and value (:g); the switch adds '_ls' when
    on.
    """
    spec = get_loss(loss_name)
    on = bool(params.get(SWITCH, False)) and spec.takes_ls
    parts = [spec.name]
    for key, default in spec.defaults_for(on).items():
        if key != SWITCH:
            h = spec.settings[key]
            parts.append(h.symbol + h.text(params.get(key, default)))
    for key, h in spec.settings.items():
        if not h.axis and key in params and params[key] != h.default:
            parts.append(h.symbol + h.text(params[key]))
    if on:
        parts.append(HYPER[SWITCH].symbol)
    return '_'.join(parts)


def setting_args(loss_name, params):
    """The command-line arguments that train the setting (loss_name, params) alone: the shared
    knobs as their flags, in HYPER order ('--temperature', '4.0'), then the method's own
    settings as --set ('--set', 'dkd.warmup=10')."""
    spec = get_loss(loss_name)
    out = [x for k, h in HYPER.items() if k in params for x in (h.flag, h.arg(params[k]))]
    for key in spec.settings:
        if key not in HYPER and key in params:
            out += ['--set', SetValues(loss_name, key, (params[key],)).arg()]
    return out


def describe_settings(loss_name):
    """'temperature T (4, > 0): ...' lines, one per declared setting of a method, for a listing
    of what --set reaches."""
    spec = get_loss(loss_name)
    lines = []
    for key, h in spec.settings.items():
        facts = ', '.join(x for x in (h.text(h.default), h.range_text(),
                                      'integer' if h.integer else '',
                                      'grid axis' if h.axis else '') if x)
        lines.append(f'{loss_name}.{key} ({facts})' + (f': {h.help}' if h.help else ''))
    return lines
