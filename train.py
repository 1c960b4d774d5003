"""Training and evaluation entry points:

    from train import Trainee, train_phase, evaluate, predict
    accuracy = evaluate(model, test_loader)           # top-1, in percent

train_phase trains any number of models in lockstep on identical batches; the loop, its steps,
precision, signals and saved state live in kd/engine/.
"""
from kd.engine.evaluate import accuracy, evaluate, predict, predict_views  # noqa: F401
from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles, train_phase  # noqa: F401
from kd.engine.step import PhaseTeacher, train_step  # noqa: F401
from kd.engine.trainee import Trainee, TraineeOptions  # noqa: F401
from kd.recipes.base import Recipe  # noqa: F401
from kd.recipes.optim import lr_at, make_optimizer, warmup_steps  # noqa: F401
