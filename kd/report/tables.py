"""The tables and sentences of a report: results.md, the console table, the gains to the
baseline and the notes on losses a run was too short to judge."""
from kd.report.labels import model_label
from kd.report.settings import is_switch, warmup_epochs


def ranked_students(models):
    """Students by validation accuracy, best first (test accuracy only reports)."""
    students = [n for n in models if n != 'teacher']
    return sorted(students, key=lambda n: -(models[n].get('best_val_acc') or -1.0))


def _pm(entry, key, digits=2):
    """'mean ± std' of entry[key] (the mean alone for one seed), '-' when it is absent."""
    if entry is None or entry.get(key) is None:
        return '-'
    std = entry.get(key + '_std')
    return f'{entry[key]:.{digits}f}' + (f' ± {std:.{digits}f}' if std is not None else '')


def results_table(results):
    """A Markdown table of every model in results.json, students ranked by validation accuracy,
    then the paired differences to the baseline."""
    models = results.get('models', {})
    ranked = _ranked_on_validation(models)
    val_head = 'Val. acc. (%) ↓' if ranked else 'Val. acc. (%)'
    lines = [f'| Model | Params | {val_head} | Test acc. (%) | Last-epoch acc. (%) | ECE (%) | '
             'Agreement w/ teacher (%) | KL to teacher | Seeds | Loss |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    order = (['teacher'] if 'teacher' in models else []) + ranked_students(models)
    for name in order:
        e = models[name]
        lines.append(f"| {model_label(name, e)} | {e['params'] / 1e6:.2f}M | "
                     f"{_pm(e, 'best_val_acc')} | {_pm(e, 'test_acc')} | "
                     f"{_pm(e, 'last_test_acc')} | {_pm(e, 'ece')} | "
                     f"{_pm(e, 'agreement')} | {_pm(e, 'kl_to_teacher', 3)} | "
                     f"{len(e['seeds'])} | {describe_loss(e)} |")
    lines.append('')
    if ranked:
        keeps_last = ((results.get('config') or {}).get('recipe_values') or {}).get(
            'select') == 'last'
        why = ('it would select a setting; the recipe keeps each run\'s last epoch'
               if keeps_last else 'it selects the checkpoints')
        lines += [f'↓ The students are ranked by validation accuracy ({why}); '
                  'the test accuracy only reports.', '']
    all_gains = results.get('gains') or {}
    if len(all_gains) > 1:
        lines += ['| Student − baseline (paired, test acc.) | Mean | Per seed | 95% CI |',
                  '|---|---:|---|---|']
        for name in [n for n in ranked_students(models) if n in all_gains]:
            g = all_gains[name]
            ci = '-' if g['ci95'] is None else f"[{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
            lines.append(f"| {name} | {g['mean']:+.2f} | "
                         f"{', '.join(f'{d:+.2f}' for d in g['per_seed'])} | {ci} |")
        lines.append('')
        if any(g['ci95'] is None for g in all_gains.values()):
            lines += [NO_INTERVAL, '']
    if len(all_gains) <= 1:
        lines.append(describe_gain(results.get('kd_gain')))
    lines += tta_lines(results)
    return '\n'.join(lines)


def tta_lines(results):
    """Under a recipe with test-time augmentation: each model's test accuracy with it beside the
    single view, and the students' paired differences with it (Markdown lines; none without)."""
    models = results.get('models', {})
    names = [n for n in (['teacher'] if 'teacher' in models else []) + ranked_students(models)
             if models[n].get('test_acc_tta') is not None]
    if not names:
        return []
    lines = ['', '| Model | Test acc., TTA (%) | Test acc., single view (%) | '
                 'Val. acc., TTA (%) |', '|---|---:|---:|---:|']
    for name in names:
        e = models[name]
        lines.append(f"| {model_label(name, e)} | {_pm(e, 'test_acc_tta')} | "
                     f"{_pm(e, 'test_acc')} | {_pm(e, 'val_acc_tta')} |")
    lines.append('')
    lines += [describe_gain(g, ('KD' if n == 'student_kd' else n) + ' with TTA')
              for n, g in (results.get('gains_tta') or {}).items()]
    lines.append('TTA: the mean of the logits of 6 views (the image and its mirror, each also '
                 'shifted by one pixel up-left and down-right; weights 1/4, 1/4, 1/8 x 4), '
                 'evaluated for the kept (last-epoch) weights.')
    return lines


NO_INTERVAL = 'n is too small for a confidence interval (run at least 2 seeds).'


def describe_gain(gain, label='KD', interval_note=True):
    """One sentence on a paired difference to the baseline (test accuracy, points).

    interval_note=False leaves out why a single seed has no interval (a list of gains says it
    once, see describe_gains)."""
    if not gain:
        return f'{label} − baseline: not measured (train both students with the same seeds).'
    per_seed = ', '.join(f'{d:+.2f}' for d in gain['per_seed'])
    text = f"{label} − baseline (paired, test accuracy): {gain['mean']:+.2f} points over " \
           f"{gain['n']} seed{'s' if gain['n'] != 1 else ''} ({per_seed})"
    if gain['ci95'] is None:
        return text + ('; ' + NO_INTERVAL if interval_note else '.')
    lo, hi = gain['ci95']
    verdict = 'excludes 0' if lo > 0 or hi < 0 else 'includes 0: not distinguishable from noise'
    return text + f'; 95% CI [{lo:+.2f}, {hi:+.2f}] (Student t, n−1 = {gain["n"] - 1}), {verdict}.'


def describe_loss(entry):
    loss = entry.get('loss')
    if not loss:
        return '-'
    params = entry.get('loss_params') or {}
    short = {'temperature': 'T', 'alpha': 'α', 'beta': 'β', 'gamma': 'γ'}
    return loss + ''.join(' LS' if is_switch(k) else f' {short.get(k, k)}={v:g}'
                          for k, v in params.items() if v is not False)


def describe_gains(results):
    """The console lines on the paired differences to the baseline, best on validation first;
    why there is no confidence interval is said once, after them."""
    all_gains = results.get('gains') or {}
    if len(all_gains) <= 1:
        return [describe_gain(results.get('kd_gain'))]
    lines = [describe_gain(all_gains[n], n, interval_note=False)
             for n in ranked_students(results['models']) if n in all_gains]
    if any(g['ci95'] is None for g in all_gains.values()):
        lines.append(NO_INTERVAL[0].upper() + NO_INTERVAL[1:])
    return lines


def results_markdown(results):
    cfg = results.get('config', {})
    run = results.get('run', {})
    git = results.get('git') or {}
    commit = (git.get('commit') or 'unknown')[:12]  # None outside a git checkout
    if (cfg.get('recipe_values') or {}).get('select') == 'last':
        selection = (f"the recipe ({cfg.get('recipe')}) keeps the last epoch's weights; the "
                     f"validation split ({cfg.get('val_fraction')}) and the test set only report.")
    elif cfg.get('val_fraction'):
        selection = (f"validation split {cfg.get('val_fraction')} of the training images selects "
                     f"the checkpoints, the test set only reports.")
    else:
        selection = 'no validation split: the last epoch\'s weights are kept, the test set only reports.'
    lines = ['# Results', '', results_table(results), '',
             f"Data: {run.get('data_dir', '?')}"
             + (f" (--subset {cfg['subset']}: not the full dataset)" if cfg.get('subset') else '')
             + '; ' + selection,
             f"Device: {run.get('device', '?')}; torch {results.get('versions', {}).get('torch')}; "
             f"git {commit}" + (' (dirty tree)' if git.get('dirty') else '') + '.',
             f"Recipe: {cfg.get('recipe', 'standard')}, {cfg.get('epochs')} epochs, batch "
             f"{cfg.get('batch_size')}, lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}; students ranked by "
             f"validation accuracy; for kd and ls, α weights the hard labels.", '']
    return '\n'.join(lines)


def _ranked_on_validation(models):
    """Whether some student has a validation accuracy (none with --val-fraction 0 or from
    --evaluate), i.e. whether ranked_students orders by it."""
    return any(e.get('best_val_acc') is not None for n, e in models.items() if n != 'teacher')


def print_table(models, log=print):
    """The console table: the teacher, then the students best on validation first, each with
    its validation and test accuracy (%, mean ± std over seeds; '-' where not measured, as for
    --evaluate, which only tests) and parameters."""
    width = max([22] + [len(model_label(n, e)) for n, e in models.items()])
    ranked = _ranked_on_validation(models)
    if ranked:
        log('Students ranked by validation accuracy (↓); the test set only reports.')
    tta = any(e.get('test_acc_tta') is not None for e in models.values())
    log(f"{'Model':<{width}} {'Val. acc. ↓' if ranked else 'Val. acc.':>16} {'Test acc.':>16} "
        f"{'Params':>8}" + (f" {'Test acc. TTA':>16}" if tta else ''))
    for name in (['teacher'] if 'teacher' in models else []) + ranked_students(models):
        e = models[name]
        log(f"{model_label(name, e):<{width}} {_pm(e, 'best_val_acc'):>16} "
            f"{_pm(e, 'test_acc'):>16} {e['params'] / 1e6:>7.2f}M"
            + (f" {_pm(e, 'test_acc_tta'):>16}" if tta else ''))
    if 'student_kd' in models and 'student_base' in models:
        diff = models['student_kd']['test_acc'] - models['student_base']['test_acc']
        log(f"{'KD − baseline':<{width}} {'':>16} {diff:>+16.2f}")


def warmup_notes(models, epochs):
    """Sentences for the losses of `models` whose distillation weight ramps up over more epochs
    than the run had (DKD's over its declared warm-up, dkd.warmup): such students never
    trained at their full weight, so a ranking of them says little about the method."""
    notes = []
    for loss in dict.fromkeys(e.get('loss') for e in models.values() if e.get('loss')):
        ramp = warmup_epochs(loss, [e.get('loss_params') for e in models.values()
                                    if e.get('loss') == loss])
        if ramp is None:   # a loss from another version of the code: nothing known about it
            continue
        if epochs < ramp:
            notes.append(f'{loss} never reached its full distillation weight: it ramps up over '
                         f'{ramp} epochs and this run had {epochs} (it ended at {epochs}/{ramp} '
                         f'of it), so this run does not judge {loss} as its authors train it.')
    return notes
