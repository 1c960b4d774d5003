"""The registry of distillation methods and their declared settings, and the grid of settings a
command line asks for.

A method registers with `register_loss` (a logit loss, a pure function; losses.py) or
`register_distiller` (a feature method, a base.Distiller subclass), declaring its settings:

- `defaults` gives the shared knobs it takes, those with a flag of their own (--temperature,
  --alpha, --beta, --gamma: HYPER), with their default values;
- `settings` declares its own: HyperParameter(name, symbol, label, default=..., low=...,
  high=..., integer=..., help=..., axis=...), e.g. DKD's warm-up or CRD's K.

Every declared setting is reached with `--set METHOD.NAME=VALUE[,VALUE...]` (several values
make a grid). A setting with `axis=True` (the shared knobs, and by default a new method's own)
is in every setting's params and name ('kd_T4_a0.1'); one with `axis=False` (a method's
constant: FitNet's hint stage, CRD's K) is in a setting's params and name only where it differs
from its default ('dkd_T4_w10'), so runs at the defaults keep their names and files.
"""
import dataclasses
import inspect
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping


@dataclass(frozen=True)
class HyperParameter:
    """One setting a method may take: its key in a setting's params, its mark in setting names
    (`symbol`, before the value: 'T4'), its label for reading, and, once a method declares it,
    its default, range and help.

    A switch (logit standardisation) takes the values False / True, written 'off' / 'on' on the
    command line; in a setting name it adds its mark only when on. The others are floats or,
    with `integer`, ints, written with :g. The range is [low, high], `low_open` excluding low
    (T > 0); None: unbounded on that side. `axis`: in every setting's params and name (False:
    only where the value differs from the default).
    """
    name: str
    symbol: str
    label: str
    switch: bool = False
    default: object = None
    low: float = None
    high: float = None
    low_open: bool = False
    integer: bool = False
    help: str = ''
    axis: bool = True

    @property
    def flag(self):
        """Its own flag, for the shared knobs: '--temperature'."""
        return '--' + self.name.replace('_', '-')

    def text(self, value):
        """The value for reading: '4', '0.1', 'on' (:g, six significant digits)."""
        if self.switch:
            return 'on' if value else 'off'
        return str(int(value)) if self.integer else f'{float(value):g}'

    def arg(self, value):
        """The value as a command line gives it back exactly: '4.0', '0.1234567', 'on', '20'."""
        if self.switch or self.integer:
            return self.text(value)
        return str(float(value))

    def declare(self, default, **changes):
        """This knob with a method's default (and other fields changed, e.g. help)."""
        return dataclasses.replace(self, default=default, **changes)

    def range_text(self):
        """'>= 0', '> 0', 'in [0, 1]', '' (unbounded)."""
        if self.low is not None and self.high is not None:
            return f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}]'
        if self.low is not None:
            return f'{">" if self.low_open else ">="} {self.low:g}'
        return f'<= {self.high:g}' if self.high is not None else ''

    def check(self, value):
        """`value` (a string from the command line, or a number / bool) typed: a bool for a
        switch, an int for an integer setting, else a float; ValueError, one sentence naming
        the setting, when it is not of its type or out of its range."""
        if self.switch:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ('on', 'off'):
                return value.lower() == 'on'
            raise ValueError(f'{self.name.replace("_", " ")} must be on or off, got {value!r}')
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{self.name} must be a number, got {value!r}') from None
        if not math.isfinite(number):
            raise ValueError(f'{self.name} must be a finite number, got {value!r}')
        if self.integer:
            if number != int(number) or (isinstance(value, str) and not _is_int(value)):
                raise ValueError(f'{self.name} must be an integer, got {value!r}')
            number = int(number)
        below = self.low is not None and (number <= self.low if self.low_open
                                          else number < self.low)
        if below or (self.high is not None and number > self.high):
            word = 'a number' if not self.integer else 'an integer'
            raise ValueError(f'{self.name} must be {word} {self.range_text()}, got '
                             f'{self.text(number)}')
        return number


def _is_int(text):
    try:
        int(text)
    except ValueError:
        return False
    return True


# The shared knobs, those with a flag of their own, in grid and name order
HYPER = {h.name: h for h in (
    HyperParameter('temperature', 'T', 'temperature T', low=0.0, low_open=True),
    HyperParameter('alpha', 'a', 'α (weight of the labels)', low=0.0, high=1.0),
    HyperParameter('beta', 'b', 'β (weight of the distillation term)', low=0.0),
    HyperParameter('gamma', 'g', 'γ (weight of the second term)', low=0.0),
    HyperParameter('logit_standardization', 'ls', 'logit standardisation', switch=True),
)}
HYPER_PARAMETERS = tuple(HYPER)
SWITCH = 'logit_standardization'


@dataclass(frozen=True)
class DistillLoss:
    """One registered method: its function (a logit loss) or `distiller` (a feature method's
    base.Distiller class, built per student: it owns the method's connectors and memories),
    its declared settings, whether it needs a teacher, one sentence on how its settings map
    onto its formula, and the epochs over which its distillation weight ramps up by default
    (0: full weight from the start; a 'warmup' setting changes it: warmup_for).

    `settings` maps every declared setting's name to its HyperParameter (default included):
    the shared knobs first, in HYPER order, then the method's own. `defaults` are those that
    form grid axes (in every setting's params), with their default values. `parts` are the
    names of the loss parts it returns ('ce' first). A loss that takes the logit
    standardisation switch has `ls_defaults` (None otherwise): the defaults that change when it
    is on. The switch is never among `defaults`: a setting's params hold
    'logit_standardization': True only when it is on, so settings without it keep their names
    and params.
    """
    name: str
    fn: Callable
    defaults: Mapping[str, object]
    uses_teacher: bool
    help: str
    warmup_epochs: int = 0
    parts: tuple = ('ce',)
    distiller: type = None
    ls_defaults: Mapping[str, float] = None
    settings: Mapping[str, HyperParameter] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @property
    def takes_ls(self):
        """Whether the loss takes the logit standardisation switch."""
        return self.ls_defaults is not None

    def defaults_for(self, logit_standardization=False):
        """The defaults with logit standardisation off or on (on: the switch itself, True, and
        its authors' values, e.g. T 2)."""
        if logit_standardization and self.takes_ls:
            return MappingProxyType({**self.defaults, **self.ls_defaults,
                                     'logit_standardization': True})
        return self.defaults

    def setting(self, key):
        """The HyperParameter `key` as this method declares it (the switch too); KeyError
        naming its settings otherwise."""
        if key == SWITCH and self.takes_ls:
            return HYPER[SWITCH]
        try:
            return self.settings[key]
        except KeyError:
            known = ', '.join(self.settings) or 'none'
            raise KeyError(f'{self.name} has no setting {key!r}; its settings: {known}') \
                from None

    def filled(self, params):
        """`params` with every declared setting's default filled in (the switch's LS defaults
        where it is on): what a feature method's constructor receives."""
        on = bool(params.get(SWITCH, False))
        base = {k: h.default for k, h in self.settings.items()}
        return {**base, **self.defaults_for(on), **params}

    def warmup_for(self, params):
        """The epochs of the distillation weight's ramp of a setting with `params`."""
        if 'warmup' in self.settings:
            return int(params.get('warmup', self.settings['warmup'].default))
        return self.warmup_epochs

    def __deepcopy__(self, memo):  # immutable and registered once: copies share it
        return self


LOSSES = {}


def register_loss(name, *, defaults=None, settings=(), uses_teacher=True, help, parts,
                  warmup_epochs=0, ls_defaults=None):
    """Decorator: register the logit loss `fn` under `name` in LOSSES (a second loss of the
    same name is refused).

    defaults maps the shared knobs the loss takes (of HYPER_PARAMETERS) to their default
    values; settings: its own HyperParameters, each with its default (the function's keyword
    of that name must default to it); parts: the names of the parts it returns ('ce' first; the
    CSV columns of a run); warmup_epochs is how many epochs the function's own ramp of the
    distillation weight lasts (reports say when a run was shorter; a setting named 'warmup'
    supersedes it); ls_defaults: for a loss that takes the logit standardisation switch (a
    `logit_standardization` keyword), the defaults that change when it is on ({} when none
    do); None: it does not take it. The function is returned unchanged.
    """
    declared = _declared(name, defaults, settings)
    ls_defaults = None if ls_defaults is None else _shared_defaults(name, ls_defaults)

    def decorator(fn):
        _check_signature(name, fn, declared)
        _register(name, declared, fn=fn, uses_teacher=bool(uses_teacher), help=help,
                  warmup_epochs=_warmup(declared, warmup_epochs), parts=tuple(parts),
                  ls_defaults=ls_defaults)
        return fn

    return decorator


def register_distiller(name, *, defaults=None, settings=(), parts, help, warmup_epochs=0):
    """Decorator: register a feature method, the base.Distiller subclass it decorates, under
    `name` in LOSSES, as register_loss does; parts: the loss parts its forward returns ('ce'
    first). The class, told its name (`method`), is returned."""
    declared = _declared(name, defaults, settings)

    def decorator(cls):
        cls.method = name
        _register(name, declared, fn=None, uses_teacher=True, help=help,
                  warmup_epochs=_warmup(declared, warmup_epochs), distiller=cls,
                  parts=tuple(parts))
        return cls

    return decorator


def _shared_defaults(name, defaults):
    """The shared knobs' defaults in HYPER_PARAMETERS order, typed; ValueError for an unknown
    key."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(HYPER_PARAMETERS)
    if unknown:
        raise ValueError(f'loss {name!r}: unknown hyper-parameters {sorted(unknown)}; '
                         f'a loss may take {", ".join(HYPER_PARAMETERS)} (declare others '
                         f'with settings=)')
    return MappingProxyType({k: HYPER[k].check(defaults[k]) for k in HYPER_PARAMETERS
                             if k in defaults})


def _declared(name, defaults, settings):
    """{name: HyperParameter} of a method: the shared knobs of `defaults`, then `settings`;
    ValueError for a clash of names or symbols, a reserved name or a default out of range."""
    declared = {k: HYPER[k].declare(v) for k, v in _shared_defaults(name, defaults).items()}
    symbols = {h.symbol for h in HYPER.values()}
    for h in settings:
        if h.name in declared or h.name in HYPER or h.symbol in symbols or '.' in h.name \
                or h.switch:
            raise ValueError(f'loss {name!r}: setting {h.name!r} (symbol {h.symbol!r}) clashes '
                             f'with another, or is a switch, or has a dot in its name')
        symbols.add(h.symbol)
        declared[h.name] = dataclasses.replace(h, default=h.check(h.default))
    return MappingProxyType(declared)


def _check_signature(name, fn, declared):
    """ValueError when the loss function's keyword default of a declared setting differs from
    the declaration (one home for each default)."""
    parameters = inspect.signature(fn).parameters
    for key, h in declared.items():
        p = parameters.get(key)
        if p is not None and p.default is not inspect.Parameter.empty and p.default != h.default:
            raise ValueError(f'loss {name!r}: {key} defaults to {p.default!r} in the function '
                             f'and to {h.default!r} in its declaration')


def _warmup(declared, warmup_epochs):
    return int(declared['warmup'].default) if 'warmup' in declared else int(warmup_epochs)


def _register(name, declared, **fields):
    if name in LOSSES:
        raise ValueError(f'a loss named {name!r} is already registered')
    defaults = MappingProxyType({k: h.default for k, h in declared.items() if h.axis})
    LOSSES[name] = DistillLoss(name, defaults=defaults, settings=declared, **fields)


def get_loss(name):
    """The DistillLoss registered as `name`; KeyError naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f'unknown loss {name!r}; known losses: {", ".join(sorted(LOSSES))}') \
            from None


def takes(spec, key):
    """Whether loss `spec` (a DistillLoss) takes hyper-parameter `key`."""
    return key in spec.settings or (key == SWITCH and spec.takes_ls)
