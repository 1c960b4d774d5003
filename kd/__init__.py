"""Knowledge distillation on image benchmarks, organised by domain.

    kd.models   the model zoo and its registry (a file per family), feature points
    kd.methods  the distillation methods and their registry (logit losses, feature methods)
    kd.data     datasets (a registry of readers) and the device-resident loader
    kd.recipes  training recipes (optimizer, schedule, augmentation, selection)
    kd.engine   the training loop: steps, precision, signals, state, evaluation
    kd.files    checkpoints: atomic writes, safe loading, records, random-number state
    kd.report   statistics, tables, plots and results files
    kd.run      one invocation: configuration, phases over seeds, output folders, resume,
                --evaluate

The import graph flows one way: run uses everything below it; report reads what the engine
wrote; the engine never imports run or report. The top-level main.py, models.py, utils.py and
train.py are the faces people use; nothing in this package imports them.
"""
