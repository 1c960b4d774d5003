"""What a reader needs to judge a run, one job per module.

    stats       means, spreads, paired differences to the baseline, the per-model aggregate
    labels      the models' printed names and phases
    settings    the methods' settings as the reports read them (from kd.methods)
    tables      results.md's tables, the console table and the sentences on the gains
    plotting    matplotlib on demand; a plot never fails the run
    curves      curves.png
    grid        grid.png
    provenance  versions, git commit, CPU and device names
    results     results.json and the files written from it

Nothing is imported here, so importing one module costs only its own imports.
"""
