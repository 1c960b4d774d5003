"""Which epoch's weights a phase keeps, and what it reports of them.

Every epoch the models are evaluated on the validation split, which selects (the first epoch
with the best accuracy, or the last one), and on the test set when due; the selected epoch's
test logits are kept, and at the end of the phase give each model's summary (accuracy,
calibration, agreement with the teacher).
"""
import os

from kd.engine.evaluate import accuracy, evaluate, predict_views
from kd.engine.metrics import agreement, expected_calibration_error
from kd.engine.precision import precision_name
from kd.files.checkpoint import atomic_save, plain_state_dict


def evaluate_epoch(trainees, data, recipe, epoch, progress, test_every=1, best_dir=None):
    """Validation (every epoch: it selects) and test (every test_every epochs (0: none), the
    last one, and whenever a model reaches a new best, so the selected epoch always has test
    logits).

    epoch: 1-based, of recipe.epochs. recipe.select 'last' keeps the last epoch's weights;
    recipe.tta adds, at the last epoch, the test-time-augmented accuracies (progress.tta).
    Updates progress.best / best_logits and writes best_<name>.pth into best_dir (None: writes
    nothing, as on the processes besides the main one). Returns
    {name: (val, test, {'val_acc_tta', 'test_acc_tta'} or {})}.
    """
    accs, epochs = {}, recipe.epochs
    keep_last = recipe.select == 'last'
    tta = recipe.tta != 'none' and epoch == epochs
    for t in trainees:
        views = {}
        if data.val and tta:
            val_logits, val_tta, val_labels = predict_views(t.eval_model, data.val, t.precision)
            val_acc, views['val_acc_tta'] = (accuracy(val_logits, val_labels),
                                             accuracy(val_tta, val_labels))
        else:
            val_acc = evaluate(t.eval_model, data.val, t.precision) if data.val else None
        best = progress.best.get(t.name, {'val_acc': -1.0, 'epoch': 0})
        # the first epoch with the best validation accuracy; the last one without a split
        # (or when the recipe keeps the last epoch)
        is_best = epoch == epochs if keep_last else val_acc is None or val_acc > best['val_acc']
        test_acc = None
        if is_best or (test_every and epoch % test_every == 0) or epoch == epochs:
            logits, test_tta, labels = predict_views(t.eval_model, data.test, t.precision, tta)
            test_acc = accuracy(logits, labels)
            if tta:
                views['test_acc_tta'] = accuracy(test_tta, labels)
        if views:
            progress.tta[t.name] = views
        if is_best:
            progress.best[t.name] = {'val_acc': -1.0 if val_acc is None else val_acc,
                                     'epoch': epoch}
            progress.best_logits[t.name] = logits
            if best_dir is not None:
                atomic_save(plain_state_dict(t.module),
                            os.path.join(best_dir, f'best_{t.name}.pth'))
        accs[t.name] = (val_acc, test_acc, views)
    return accs


def finish_phase(trainees, data, progress, teacher_test_logits=None):
    """The summary of each model: the selected epoch's test metrics, from its kept logits."""
    labels = data.test.labels
    summary = {}
    for t in trainees:
        logits = progress.best_logits[t.name]
        last = progress.history[t.name][-1] if progress.history[t.name] else {}
        best = progress.best[t.name]
        entry = {
            'test_acc': accuracy(logits, labels), 'last_test_acc': last.get('test_acc'),
            'best_epoch': best['epoch'],
            'best_val_acc': best['val_acc'] if best['val_acc'] >= 0 else None,
            'params': sum(p.numel() for p in t.module.parameters()),
            'ece': expected_calibration_error(logits, labels),
            'precision': precision_name(t.precision),
            'loss': t.loss.name, 'loss_params': t.loss_params,
            # test-time augmentation (recipe.tta) of the kept weights, beside the single view
            **progress.tta.get(t.name, {}),
        }
        if teacher_test_logits is not None:
            entry.update(agreement(teacher_test_logits, logits))
        summary[t.name] = entry
    if teacher_test_logits is not None:
        summary['teacher_in_use'] = {
            'test_acc': accuracy(teacher_test_logits, labels),
            'ece': expected_calibration_error(teacher_test_logits, labels)}
    return {'models': summary, 'elapsed_seconds': round(progress.elapsed, 2),
            'epochs_run': progress.epoch, 'estimate': progress.estimate,
            'test_logits': dict(progress.best_logits)}
