"""Every default of the command line, and the constants the recipes share.

main.build_parser and config.flag_args read the flags' defaults here (DEFAULTS); base.Recipe's
fields and the recipe files (standard.py, fast.py, reference.py) hold the optimisation's.
"""
from types import MappingProxyType

BATCH_SIZE = 128      # the standard recipe's global batch; its learning rate scales with it
BASE_LR = 0.1         # the standard recipe's learning rate for a batch of 128
DATASET = 'cifar10'
TEACHER_ARCH = 'resnet18'
STUDENT_ARCH = 'cnn'
LOSS = 'kd'
VAL_FRACTION = 0.1
SPLIT_SEED = 0
RECIPE = 'standard'

# Every command-line flag's default, by argparse name: main.build_parser and config.flag_args
# read them here. None: resolved later (the recipe's epochs, batch size, lr, weight decay, test
# interval and architectures (their feature points: the registered ones); each loss's temperature, alpha and beta from
# kd.methods.registry.LOSSES[name].defaults, gamma likewise, logit standardisation off;
# the teacher checkpoint OUT_DIR/best_teacher.pth; amp decided per device).
DEFAULTS = MappingProxyType({
    'train_teacher': False, 'evaluate': False, 'recipe': RECIPE, 'dataset': DATASET,
    'teacher_arch': None, 'student_arch': None, 'loss': (LOSS,), 'epochs': None,
    'teacher_points': None, 'student_points': None,  # --*-points: the registered points
    'batch_size': None, 'lr': None, 'weight_decay': None, 'temperature': None, 'alpha': None,
    'beta': None, 'gamma': None, 'logit_standardization': None, 'sets': None,  # --set: none
    'seed': 0, 'seeds': None, 'data_dir': './data', 'out_dir': '.', 'device': 'auto',
    'subset': None, 'val_fraction': VAL_FRACTION, 'split_seed': SPLIT_SEED, 'test_every': None,
    'no_baseline': False, 'teacher_checkpoint': None, 'num_workers': 2, 'amp': None,
    'stack_students': 'auto', 'compile': False, 'resume': False, 'restart': False,
    'tensorboard': False, 'image_size': None, 'data_in_memory': 'auto',
})
