"""The training recipe and the command line's defaults, in one place."""
from dataclasses import dataclass

BATCH_SIZE = 128      # the global batch; the learning rate scales with it
BASE_LR = 0.1         # for a batch of 128
DATASET = 'cifar10'
TEACHER_ARCH = 'resnet18'
STUDENT_ARCH = 'cnn'
LOSS = 'kd'
VAL_FRACTION = 0.1
SPLIT_SEED = 0


@dataclass
class Recipe:
    """One recipe for every model (lr is for the global batch)."""
    epochs: int = 200
    lr: float = BASE_LR
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.03   # of all steps (but see train.warmup_steps), then cosine
    temperature: float = 4.0        # kd's defaults, for Trainees built without loss_params
    alpha: float = 0.1


def default_lr(batch_size):
    return BASE_LR * batch_size / BATCH_SIZE
