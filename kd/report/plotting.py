"""What every plot shares: matplotlib imported on demand, and a figure saved without ever
failing the run."""


def pyplot(log, what):
    """matplotlib.pyplot on the Agg backend, or None (said through `log`) when it is missing or
    broken: a run never fails for a plot."""
    try:
        import matplotlib  # optional: a run without it writes no plots
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception as e:
        reason = 'is not installed' if isinstance(e, ImportError) else f'cannot be used ({e})'
        log(f'matplotlib {reason}: skipping {what} (pip install matplotlib)')
        return None
    return plt


def save_figure(plt, make_figure, path, log):
    """Draw with make_figure() (None: nothing to draw) and write it to path; returns the path or
    None. A damaged CSV or a plotting error is said through `log` and skips the plot."""
    try:
        fig = make_figure()
        if fig is None:
            return None
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except Exception as e:
        plt.close('all')
        log(f'could not draw {path}: {e}; skipping it')
        return None
