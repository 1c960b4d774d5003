"""grid.png: a heat map per loss of validation accuracy over the settings a run trained."""
from dataclasses import dataclass

from kd.report.plotting import pyplot, save_figure
from kd.report.settings import axis_label, is_switch, settings, value_text


def _param(entry, key):
    """A setting's value of `key`; the switch reads off where its params do not name it."""
    params = entry.get('loss_params') or {}
    return params.get(key, False) if is_switch(key) else params.get(key)


def grid_axes(models, loss):
    """(row hyper-parameter, column hyper-parameter or None) of `loss`'s heat map: the first
    two that vary among its settings, in the methods' order, else the first two it takes
    (kd: T and α; crd_kd: T and β; fitnet: β; dist gridded over γ alone: γ)."""
    entries = [e for e in models.values() if e.get('loss') == loss]
    taken = {k for e in entries for k in (e.get('loss_params') or {})}
    # the shared knobs in the methods' order, then the method's own settings (--set) as seen
    order = [k for k in settings() if k in taken] + \
        [k for e in entries for k in (e.get('loss_params') or {}) if k not in settings()]
    order = list(dict.fromkeys(order))
    varying = [k for k in order if len({_param(e, k) for e in entries}) > 1]
    keys = varying + [k for k in order if k not in varying]
    return (keys[0] if keys else None), (keys[1] if len(keys) > 1 else None)


def grid_cells(models):
    """{loss: {(row value, column value): (validation accuracy, name)}} for every loss of a run
    that trained some loss on two or more settings ({} otherwise); the axes are grid_axes'."""
    cells = {}
    for name, e in models.items():
        if name in ('teacher', 'student_base') or not e.get('loss') or e.get('best_val_acc') is None:
            continue
        row, col = grid_axes(models, e['loss'])
        cells.setdefault(e['loss'], {})[(row and _param(e, row), col and _param(e, col))] = \
            (e['best_val_acc'], name)
    return cells if any(len(c) > 1 for c in cells.values()) else {}


def plot_grid(models, path, log=print):
    """grid.png: a heat map per loss over its settings, of validation accuracy (see
    grid_figure). Nothing is drawn when no loss has two settings. Returns the path or None."""
    if not grid_cells(models):
        return None
    plt = pyplot(log, 'grid.png')
    if plt is None:
        return None
    return save_figure(plt, lambda: grid_figure(models), path, log)


@dataclass(frozen=True)
class _ColourScale:
    """One colour scale for every panel, diverging around the baseline's accuracy."""
    norm: object   # matplotlib.colors.Normalize, centred on the baseline
    cmap: object   # the diverging colour map
    base: object   # the baseline's validation accuracy (%), or None without a baseline


def _colour_scale(models, cells):
    """The _ColourScale of grid.png: centred on the baseline (else on the middle of the values),
    wide enough for the value furthest from it."""
    import matplotlib.pyplot as plt  # optional: imported only when a figure is drawn
    from matplotlib.colors import Normalize

    base = models.get('student_base', {}).get('best_val_acc')
    values = [v for grid in cells.values() for v, _ in grid.values()]
    centre = base if base is not None else (min(values) + max(values)) / 2
    half = max(abs(v - centre) for v in values) or 1.0
    return _ColourScale(Normalize(centre - half, centre + half), plt.get_cmap('RdBu'), base)


def _axis_values(grid, i):
    """The sorted values of a grid's row (i = 0) or column (i = 1) setting, None last."""
    return sorted({k[i] for k in grid}, key=lambda v: (v is None, v))


def _label_axes(ax, models, loss, temps, alphas):
    """A heat map's ticks and axis labels: the settings' values and names."""
    row_key, col_key = grid_axes(models, loss)
    if alphas == [None]:
        ax.set_xticks([])
        ax.set_xlabel('one setting' if col_key is None else axis_label(col_key, loss))
    else:
        ax.set_xticks(range(len(alphas)), [value_text(col_key, a, loss) for a in alphas])
        ax.set_xlabel(axis_label(col_key, loss))
    ax.set_yticks(range(len(temps)), ['-' if t is None else value_text(row_key, t, loss)
                                      for t in temps])
    ax.set_ylabel('no hyper-parameter' if row_key is None else axis_label(row_key, loss))
    ax.set_title(loss, fontsize=10)


def _heat_map(ax, models, loss, grid, scale):
    """One loss's panel: each setting's validation accuracy and its difference to the baseline."""
    temps, alphas = _axis_values(grid, 0), _axis_values(grid, 1)
    table = [[grid.get((t, a), (float('nan'),))[0] for a in alphas] for t in temps]
    ax.imshow(table, cmap=scale.cmap, norm=scale.norm, aspect='auto')
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            if v != v:
                continue
            text = f'{v:.2f}' + (f'\n{v - scale.base:+.2f}' if scale.base is not None else '')
            # white text on the saturated ends of the scale, black near the middle
            ax.text(j, i, text, ha='center', va='center', fontsize=9,
                    color='w' if abs(scale.norm(v) - 0.5) > 0.3 else 'k')
    _label_axes(ax, models, loss, temps, alphas)


def _grid_title(models, cells, base):
    n_seeds = max(len(models[n].get('seeds') or [0]) for g in cells.values() for _, n in g.values())
    title = 'Validation accuracy (%) per setting' + (
        f', mean over {n_seeds} seeds' if n_seeds > 1 else '')
    if base is not None:
        title += f'; under it, the difference to the baseline ({base:.2f}%): blue above, red below'
    return title


def grid_figure(models):
    """The figure of grid.png, or None when no loss has two settings.

    One heat map per loss (rows and columns: the first two hyper-parameters it takes, e.g.
    temperature T and α for kd, β for fitnet), each cell the validation accuracy
    (%, mean over seeds) and, under it, its difference to the baseline's. One colour scale for
    all panels, diverging around the baseline: blue above it, red below, white level.
    """
    import matplotlib.pyplot as plt  # optional: imported only when a figure is drawn
    from matplotlib.cm import ScalarMappable

    cells = grid_cells(models)
    if not cells:
        return None
    scale = _colour_scale(models, cells)
    widths = [len(_axis_values(g, 1)) for g in cells.values()]
    rows = max(len(_axis_values(g, 0)) for g in cells.values())
    fig, axes = plt.subplots(1, len(cells), figsize=(1.5 * sum(widths) + 1.4 * len(cells) + 1.2,
                                                     0.75 * rows + 2.2),
                             layout='constrained', squeeze=False, width_ratios=widths)
    for ax, (loss, grid) in zip(axes[0], cells.items()):
        _heat_map(ax, models, loss, grid, scale)
    fig.colorbar(ScalarMappable(norm=scale.norm, cmap=scale.cmap), ax=axes[0].tolist(),
                 label='validation accuracy (%)')
    fig.suptitle(_grid_title(models, cells, scale.base), fontsize=10)
    return fig
