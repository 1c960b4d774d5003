"""Training and evaluation entry points:

    from train import Trainee, train_phase, evaluate, predict
    accuracy = evaluate(model, test_loader)           # top-1, in percent

train_phase trains any number of models in lockstep on identical batches; the loop, its steps,
precision, signals and saved state live in kd/engine/.
"""
from kd.engine.loop import (Recipe, Trainee, accuracy, evaluate, lr_at, make_optimizer,  # noqa: F401
                            predict, predict_views, train_phase, train_step, warmup_steps)
