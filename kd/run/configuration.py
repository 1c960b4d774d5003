"""The printed configuration: what a phase runs with, every value resolved ('Configuration:'),
recorded as results.json's config['configuration']; and the losses' resolved settings."""
from kd.engine.precision import choose_precision, precision_name
from kd.methods.registry import HYPER, HYPER_PARAMETERS, get_loss, takes
from kd.recipes.defaults import RECIPE
from kd.recipes.base import get_recipe, scaled_lr
from kd.report.provenance import device_name
from kd.run.specs import distilled_names


def loss_settings(specs):
    """{loss: {hyper-parameter: [values]}} of the distilled students in specs (the settings that
    train, defaults applied), in the students' order; the baseline's 'ce' takes none."""
    settings = {}
    for spec in specs:
        if spec.loss == 'ce':
            continue
        entry = settings.setdefault(spec.loss, {})
        for key, value in spec.params.items():
            if value not in entry.setdefault(key, []):
                entry[key].append(value)
    for loss, entry in settings.items():  # a switch seen on somewhere: say where it was off too
        switch = entry.get('logit_standardization')
        if switch and any('logit_standardization' not in s.params for s in specs
                          if s.loss == loss):
            switch.insert(0, False)
        for key, h in get_loss(loss).settings.items():  # a constant left out where at default
            if not h.axis and key in entry and any(key not in s.params for s in specs
                                                   if s.loss == loss):
                entry[key].append(h.default)
    return settings


def describe_loss_settings(settings, given=()):
    """['kd: T=4 (its default), alpha=0.1 (its default)', ...]: one line per loss of
    loss_settings's result. given: the hyper-parameters given on the command line (where one
    does not apply to a loss, its line says so: '--beta does not apply')."""
    symbols = {'temperature': 'T', 'alpha': 'alpha', 'beta': 'beta', 'gamma': 'gamma',
               'logit_standardization': 'logit standardisation'}
    lines = []
    for name, values in settings.items():
        spec = get_loss(name)
        on = any(values.get('logit_standardization', []))
        defaults = spec.defaults_for(on)
        parts = []
        for key, used in values.items():
            text = ', '.join(spec.setting(key).text(v) for v in used)
            if used == [defaults.get(key)] and not spec.setting(key).switch:
                text += ' (its default)'
            parts.append(f'{symbols.get(key, key)}={text}')
        parts += [f'{HYPER[key].flag} does not apply' for key in HYPER_PARAMETERS
                  if key in given and not takes(spec, key)]
        lines.append(f'{name}: ' + ', '.join(parts))
    return lines


def resolved_configuration(config, device, world_size=1, specs=None, teacher_arch=None):
    """What config.phase ('teacher', 'students' or 'evaluate') runs with, every value resolved,
    as an ordered {label: value}: only the settings that apply to the phase, defaults applied (the
    learning rate scaled to the batch, each loss's own T and alpha, the teacher's architecture
    from its checkpoint's record), never None. Values are strings, numbers or lists of strings
    (one line each). The run prints it under 'Configuration:' and results.json records it as
    its phase's config['configuration'] (both from the run's record.RunRecord).

    config: the RunConfig; device: the torch.device it resolved to; specs: phase_specs's models
    of the phase (not for 'evaluate'); teacher_arch: the students' teacher's architecture.
    """
    view = {'phase': config.phase, 'dataset': f'{config.dataset} ({config.num_classes} classes)',
            'data dir': config.data_dir,
            'subset': 'all' if config.subset is None else config.subset}
    if config.phase == 'evaluate':
        if config.subset is None:  # each checkpoint on the test images its run used
            view['subset'] = 'as in the runs that trained the checkpoints'
        view['checkpoints'] = (f'the last run of each phase in {config.out_dir} '
                               f'(run_teacher.json, run_students.json)')
        view['amp'] = amp_text(config, device)
        view['device'] = device_name(device)
        return view
    recipe = config.recipe  # the recipe's values where a flag left one open
    view['recipe'] = recipe.name + (' (the default)' if recipe.name == RECIPE else '')
    view.update(models_view(config, specs, teacher_arch))
    view.update(optimisation_view(recipe))
    view.update(schedule_view(config))
    view['amp'] = amp_text(config, device)
    if config.phase == 'students':
        view['stack students'] = config.stack_students
    view['compile'] = 'on' if config.compile else 'off'
    view['resume'] = 'on' if config.resume else 'off (--restart)' if config.restart else 'off'
    view['tensorboard'] = 'on' if config.tensorboard else 'off'
    view['out dir'] = config.out_dir
    view['device'] = device_name(device) + (f' x {world_size} processes' if world_size > 1
                                            else '')
    return view


def amp_text(config, device):
    """The 'amp' line: the precision by the fixed rule and which flag chose it, or, in auto
    mode on a training phase, that it is measured or kept from the saved run later on."""
    if config.amp is None and config.phase != 'evaluate':  # measured or ruled later on
        return ('kept from the saved run, else auto (decided below)' if config.resume else
                'auto (decided below)')
    # --evaluate, and forced modes, follow the fixed rule
    role = 'student' if config.phase == 'students' else 'teacher'
    name = precision_name(choose_precision(role, device, config.amp))
    return name + (' (auto)' if config.amp is None else ' (--amp)' if config.amp else
                   ' (--no-amp)')


def models_view(config, specs, teacher_arch):
    """The lines naming the phase's models: architectures, and the students' teacher, losses,
    distilled students and baseline."""
    def architecture(name, default):
        return name + (' (the default)' if name == default else '')

    recipe, view = config.recipe, {}
    if config.phase == 'teacher':
        view['teacher arch'] = architecture(specs[0].arch, recipe.teacher_arch)
        return view
    view['student arch'] = architecture(specs[0].arch, recipe.student_arch)
    view['teacher checkpoint'] = config.teacher_checkpoint
    view['teacher arch'] = teacher_arch
    view['losses'] = describe_loss_settings(
        loss_settings(specs), [k for k in HYPER_PARAMETERS if getattr(config, k) is not None])
    distilled = distilled_names(specs)
    view['students'] = f'{len(distilled)}: ' + ', '.join(distilled)
    view['baseline'] = ('off (--no-baseline)' if config.no_baseline else
                        'student_base (cross-entropy on the labels only)')
    return view


def optimisation_view(recipe):
    """Epochs, batch size, learning rate (how it was scaled) and weight decay of `recipe`."""
    view = {'epochs': recipe.epochs, 'batch size': recipe.batch_size}
    if recipe.lr_unit == 'per_1024':  # the fast recipe's unit
        view['lr'] = f'{recipe.lr:g} per 1,024 images'
        view['weight decay'] = f'{recipe.weight_decay:g} per 1,024 images'
    else:
        base = get_recipe(recipe.name)  # as registered: the lr at its own batch size
        view['lr'] = f'{recipe.lr:g}' + (
            f' ({base.lr:g} x batch size {recipe.batch_size} / {base.batch_size})'
            if recipe.lr == scaled_lr(base, recipe.batch_size) else '')
        view['weight decay'] = f'{recipe.weight_decay:g}'
    return view


def schedule_view(config):
    """Seeds, validation split and test interval."""
    view = {}
    if not config.per_seed_folders:
        view['seed'] = config.seeds[0]
    else:
        view['seeds'] = ', '.join(map(str, config.seeds)) + ' (one folder each: seed<N>/)'
    view['val fraction'] = f'{config.val_fraction:g}' + (
        ' (no validation: the last epoch is kept)' if config.val_fraction == 0 else '')
    view['split seed'] = config.split_seed
    every = config.test_every
    view['test every'] = (f'{every} epoch(s)' if every < config.recipe.epochs
                          else 'the last epoch only')
    return view


def print_configuration(view, log=print):
    """resolved_configuration's view, one label per line (a list continues on the next lines)."""
    log('Configuration:')
    for label, value in view.items():
        for i, line in enumerate(value if isinstance(value, list) else [value]):
            log(f'  {label if i == 0 else "":<20} {line}')
