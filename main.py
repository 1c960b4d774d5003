"""Knowledge distillation on CIFAR: train a teacher, then distilled students and a baseline student.

    python main.py --train-teacher                  # writes best_teacher.pth
    python main.py --temperature 4 --alpha 0.1      # writes best_student_kd.pth, best_student_base.pth
    python main.py --loss kd dkd ls --temperature 2 4 8 --alpha 0.1 0.5   # a grid, in one run
    python main.py --loss fitnet dkd --set fitnet.beta=50,100 --set dkd.warmup=10   # settings
    python main.py --evaluate                       # test accuracy of the last runs' checkpoints

This file parses the command line; kd/run/config.py resolves and validates it into one frozen
RunConfig; kd/run/runner.py runs that.
"""
import argparse
import math
import os
import sys

import kd.recipes as r
from kd.files.checkpoint import CheckpointError
from kd.run.config import UsageError, resolve
from kd.data.datasets import dataset_names
from kd.engine.distributed import shutdown_distributed
from kd.methods.grid import SET_SYNTAX
from kd.methods.registry import HYPER, LOSSES
from kd.models import model_names
from kd.run.commands import resume_command
from kd.run.runner import run
from kd.engine.signals import NonFiniteLoss, StartupInterrupted, StopNow, TrainingInterrupted
from kd.run.tuning import BF16_MIN_SPEEDUP, CACHE_ENV, decisions_path
from kd.data.datasets import DataError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of the usage block
        raise UsageError(f'{message} (see python main.py --help)')


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
    return value


def build_parser():
    """The command line's parser: its flags by group, in the order --help lists them."""
    p = ArgumentParser(
        description='Knowledge distillation on CIFAR: a teacher (ResNet-18 by default), then '
                    'distilled students and a baseline student trained in lockstep on identical '
                    'batches, so their differences are paired.',
        epilog='alpha weights the HARD LABELS: alpha=0.1 puts 0.9 on the teacher. Losses '
               '(--loss): ' + ' '.join(f'{n}: {spec.help}' for n, spec in LOSSES.items()
                                       if n != 'ce')
               + ' CE is the cross-entropy on the labels with the recipe\'s label smoothing: '
               + ', '.join(f'{n} {r.get_recipe(n).label_smoothing:g}' for n in r.recipe_names())
               + ' (the baseline student and the teacher train on it too).')
    for add_group in (phase_flags, optimisation_flags, loss_flags, data_flags, runtime_flags):
        add_group(p.add_argument)
    return p


def phase_flags(a):
    """What runs: the phase, the recipe, the dataset, the architectures and the losses."""
    defaults, fast = r.get_recipe('standard'), r.get_recipe('fast')
    default = r.DEFAULTS  # every flag's default, in one place
    a('--train-teacher', action='store_true', default=default['train_teacher'],
      help='train the teacher and write best_teacher.pth (default: train the students)')
    a('--evaluate', action='store_true', default=default['evaluate'],
      help='evaluate the checkpoints of the last run of each phase in --out-dir on the test '
           'images their runs used (their --subset) and print the table (default: off)')
    a('--recipe', default=default['recipe'], choices=r.recipe_names(),
      help='training recipe: standard (SGD, warm-up then cosine, 200 epochs of batch 128, crop '
           'and flip), fast (airbench94\'s techniques: 10 epochs of batch 1024, patch '
           'whitening, triangular schedule, label smoothing 0.2, lookahead averaging, '
           'test-time augmentation; default models airbench94 and airbench94_small) or reference '
           '(the benchmark tables\' recipe of RepDistiller and mdistiller: 240 epochs of batch 64, '
           'lr 0.05, plain momentum, x0.1 at epochs 150, 180, 210; default models resnet32x4 and '
           'resnet8x4). Flags given explicitly override its values (default: '
           f'{r.RECIPE})')
    a('--dataset', default=default['dataset'], choices=dataset_names(),
      help='cifar10 (10 classes), cifar100 (100 classes), tinyimagenet (--data-dir holding '
           'tiny-imagenet-200/ of the official release; its val/ is the test set; 64x64) or '
           'imagefolder (--data-dir holding train/<class>/* and val/<class>/* or '
           'test/<class>/*, any image Pillow reads; see --image-size) (default: '
           f'{r.DATASET})')
    a('--teacher-arch', default=default['teacher_arch'], metavar='ARCH',
      help=f'teacher architecture: a registered model ({", ".join(model_names())}), or your '
           f'own: torchvision:NAME, timm:NAME, FILE.py:CLASS or package.module:CLASS (built '
           f'with num_classes=, no pretrained weights); the students\' phase and --evaluate '
           f'read it from the checkpoint\'s record (default: the recipe\'s, '
           f'{defaults.teacher_arch} / {fast.teacher_arch})')
    a('--student-arch', default=default['student_arch'], metavar='ARCH',
      help=f'student architecture, as --teacher-arch (default: the recipe\'s, '
           f'{defaults.student_arch} / {fast.student_arch})')
    a('--teacher-points', nargs='+', default=default['teacher_points'], metavar='PATHS',
      help='the teacher\'s feature points by module path, in order (\'layer2,layer3\'; '
           '\'PATH:in\' is the module\'s input): the feature methods read them as stage1..N '
           '(the input of the last nn.Linear as the pooled embedding) (default: the registered '
           'model\'s points)')
    a('--student-points', nargs='+', default=default['student_points'], metavar='PATHS',
      help='the students\' feature points by module path, as --teacher-points')
    a('--loss', nargs='+', default=list(default['loss']), choices=[n for n in LOSSES if n != 'ce'],
      metavar='NAME',
      help='distillation loss(es): ' + ', '.join(n for n in LOSSES if n != 'ce')
           + '; several train one student per loss and setting, in lockstep '
           f'(default: {" ".join(default["loss"])})')


def optimisation_flags(a):
    """The recipe's values a flag overrides: epochs, batch size, learning rate, weight decay."""
    defaults, fast = r.get_recipe('standard'), r.get_recipe('fast')
    reference = r.get_recipe('reference')
    default = r.DEFAULTS
    a('--epochs', type=positive_int, default=default['epochs'],
      help=f'epochs per model; --recipe fast: {fast.epochs}, reference: {reference.epochs} '
           f'(default: {defaults.epochs})')
    a('--batch-size', type=positive_int, default=default['batch_size'],
      help='global batch size, the same whatever the number of torchrun processes; '
           f'--recipe fast: {fast.batch_size}, reference: {reference.batch_size} (default: '
           f'{defaults.batch_size})')
    a('--lr', type=finite_float, default=default['lr'],
      help=f'peak learning rate; standard: of SGD (default: {r.BASE_LR} * batch-size / '
           f'{r.BATCH_SIZE}); fast: per 1,024 images, airbench\'s unit (default: {fast.lr:g}); '
           f'reference: {reference.lr:g} * batch-size / {reference.batch_size} (the tables use '
           '0.01 for MobileNet and ShuffleNet students)')
    a('--weight-decay', type=finite_float, default=default['weight_decay'],
      help=f'weight decay; standard: of SGD (default: {defaults.weight_decay:g}); fast: per '
           f'1,024 images (default: {fast.weight_decay:g})')


def loss_flags(a):
    """The losses' settings: the shared knobs, the logit standardisation switch and --set."""
    default = r.DEFAULTS
    kd = LOSSES['kd'].defaults
    a('--temperature', type=finite_float, nargs='+', default=default['temperature'],
      metavar='T',
      help='distillation temperature(s) T > 0; several values make a grid (default: '
           f'{kd["temperature"]}; for ls its authors\' {LOSSES["ls"].defaults["temperature"]})')
    a('--alpha', type=finite_float, nargs='+', default=default['alpha'], metavar='A',
      help='weight of the hard-label CE in [0, 1], for kd and ls: alpha=0.1 puts 0.9 on the '
           'teacher (kd: (1-alpha)*T^2*KL; ls: 10*(1-alpha)*T^2*KL); dkd keeps CE weight 1; '
           f'several values make a grid (default: {kd["alpha"]})')
    a('--beta', type=finite_float, nargs='+', default=default['beta'], metavar='B',
      help='weight >= 0 of a method\'s distillation term (loss = CE + beta*term; rkd: of its '
           'distance term; dist: of its inter-class relation); several values make a grid '
           '(default: each method\'s authors\' value: '
           + ', '.join(f'{n} {spec.defaults["beta"]:g}' for n, spec in LOSSES.items()
                       if 'beta' in spec.defaults) + ')')
    a('--gamma', type=finite_float, nargs='+', default=default['gamma'], metavar='G',
      help='weight >= 0 of a method\'s second term (rkd: its angle term; dist: its intra-class '
           'relation); several values make a grid (default: each method\'s authors\' value: '
           + ', '.join(f'{n} {spec.defaults["gamma"]:g}' for n, spec in LOSSES.items()
                       if 'gamma' in spec.defaults) + ')')
    a('--logit-standardization', nargs='+', choices=('off', 'on'),
      default=default['logit_standardization'], metavar='{off,on}',
      help='logit standardisation (Sun et al., CVPR 2024) for ' + ', '.join(
          n for n, spec in LOSSES.items() if spec.takes_ls)
      + ': both logits z-scored per image before the distillation term; on, kd and dkd take '
        'their authors\' T=2 unless --temperature is given and their distillation weight x10 '
        '(kd, = ls) or x9 (dkd); "off on" makes both a grid (default: off)')
    a('--set', action='append', dest='sets', default=default['sets'], metavar=SET_SYNTAX,
      help='a setting a method declares, for the methods of --loss: METHOD.NAME=VALUE, several '
           'values separated by commas making a grid (e.g. --set fitnet.beta=50,100 trains two '
           'fitnet students); repeatable, one --set per setting; over --temperature, --alpha, '
           '--beta, --gamma for that method. A constant of a method enters the students\' names '
           'only where it differs from its default (dkd_T4_w10). Each method\'s own settings '
           '(default): ' + '; '.join(
               f'{n}: ' + ', '.join(f'{k} {h.text(h.default)}' for k, h in spec.settings.items()
                                   if k not in HYPER)
               for n, spec in LOSSES.items() if set(spec.settings) - set(HYPER))
           + ' (default: none)')


def data_flags(a):
    """Seeds, folders, device, the data's subset and split, testing, the baseline, the teacher."""
    default = r.DEFAULTS
    a('--seed', type=int, default=default['seed'],
      help='seed of initialization, data order and augmentation (default: '
           f'{default["seed"]})')
    a('--seeds', type=int, nargs='+', default=default['seeds'], metavar='N',
      help='run once per seed into OUT_DIR/seed<N>/ and aggregate (mean, std, paired gains '
           'with 95%% CI); top-level best_*.pth are the first seed\'s (default: off, one --seed)')
    a('--data-dir', default=default['data_dir'],
      help='folder holding cifar-10-batches-py / cifar-100-python (or where to download it), '
           'tiny-imagenet-200/, or an image folder\'s train/ and val/ '
           f'(default: {default["data_dir"]})')
    a('--image-size', type=positive_int, default=default['image_size'], metavar='N',
      help='tinyimagenet / imagefolder: decode every image once to N x N (shorter side resized '
           'to N, then the centre N x N cropped), before the training crop and flip (default: '
           'the images\' own size, which must then be the same for all)')
    a('--data-in-memory', choices=('auto', 'on', 'off'), default=default['data_in_memory'],
      help='tinyimagenet / imagefolder: on decodes every image once into memory (on the '
           'training device), off streams them from the files with DataLoader workers (one '
           'per core, at most 8) and pinned memory, auto keeps them in memory when the decoded '
           'images take at most half the free memory; the same batches either way (default: '
           'auto)')
    a('--out-dir', default=default['out_dir'],
      help='where checkpoints, logs and results go; a fresh run of a phase first moves the '
           f'files of its earlier run there to previous/<phase>-<time>/ (default: '
           f'{default["out_dir"]})')
    a('--device', default=default['device'],
      help=f'auto (cuda when available), cpu, cuda or cuda:N (default: {default["device"]})')
    a('--subset', type=positive_int, default=default['subset'], metavar='N',
      help='use only the first N training and the first N test images, for quick CPU runs; '
           'results say so; --evaluate takes the checkpoints\' own unless given (default: all)')
    a('--val-fraction', type=finite_float, default=default['val_fraction'],
      help='share of the training images held out to select the best epoch; 0 trains on all '
           f'and keeps the last epoch (default: {default["val_fraction"]})')
    a('--split-seed', type=int, default=default['split_seed'],
      help='which images are held out: the same for the teacher and every student seed, so the '
           f'students select on images the teacher never trained on (default: '
           f'{default["split_seed"]})')
    a('--test-every', type=positive_int, default=default['test_every'], metavar='N',
      help='report test accuracy every N epochs (and at the last and every selected epoch); '
           'validation runs every epoch (default: standard 1; fast: the last epoch only)')
    a('--no-baseline', action='store_true', default=default['no_baseline'],
      help='train only the distilled students, not the baseline student (default: train it)')
    a('--teacher-checkpoint', default=default['teacher_checkpoint'],
      help='teacher weights for the students (default: OUT_DIR/best_teacher.pth)')
    a('--num-workers', type=int, default=default['num_workers'],
      help='unused, kept so reference commands still run: the data lives in device memory and '
           'is augmented in batches there (a streamed folder dataset takes one DataLoader '
           f'worker per core, up to 8) (default: {default["num_workers"]})')


def runtime_flags(a):
    """Precision, stacking, compilation, resuming and logging."""
    default = r.DEFAULTS
    a('--amp', action=argparse.BooleanOptionalAction, default=default['amp'],
      help='mixed precision: --amp forces bf16 autocast (fp16 on GPUs without native bf16), '
           '--no-amp float32. Auto: bf16 on GPUs that have it, fp16 on older ones; on a CPU '
           'fp32 and bf16 are timed once per machine, architecture and batch shape, bf16 kept '
           f'only when {BF16_MIN_SPEEDUP:g}x faster, and the decision stored in '
           f'{decisions_path().replace("%", "%%")} (${CACHE_ENV} relocates its folder; delete '
           'the file to measure again). A resumed run keeps its precision (default: auto)')
    a('--stack-students', choices=('auto', 'on', 'off'), default=default['stack_students'],
      help='train students of one architecture as one batched computation (torch.func.vmap; '
           'results equal the one-by-one loop within float rounding). auto: on CUDA, when it '
           f'measures faster at start-up (default: {default["stack_students"]})')
    a('--compile', action='store_true', default=default['compile'],
      help='torch.compile the models (default: off)')
    a('--resume', action='store_true', default=default['resume'],
      help='continue the unfinished run whose state (last_<phase>.pt) is in --out-dir '
           '(default: off)')
    a('--restart', action='store_true', default=default['restart'],
      help='set an unfinished run in --out-dir aside (into previous/) and start over '
           '(default: off)')
    a('--tensorboard', action='store_true', default=default['tensorboard'],
      help='also write the per-epoch scalars to OUT_DIR/tensorboard/<phase> (default: off)')


def validate(args):
    """The RunConfig of parsed flags `args` (config.resolve); raises UsageError for values
    argparse's types cannot judge alone."""
    return resolve(args)


def parse_config(argv=None):
    """The RunConfig of command-line arguments `argv` (default: sys.argv[1:]); raises
    UsageError (exit 2) for bad usage or a bad value."""
    return resolve(build_parser().parse_args(argv))


def main(argv=None):
    try:
        return run(parse_config(argv))
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (CheckpointError, DataError, NonFiniteLoss) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if os.environ.get('RANK', '0') != '0':  # every rank stopped; rank 0 says so once
            return 128 + int(e.signum)
        print(f'\nInterrupted (signal {int(e.signum)}); the state is saved in {e.state_path}.\n'
              f'Resume with: {resume_command()}', file=sys.stderr)
        return 128 + int(e.signum)
    except StartupInterrupted as e:  # before the first batch: nothing to save or resume
        if os.environ.get('RANK', '0') == '0':
            print(f'\nInterrupted (signal {int(e.signum)}) before training started; nothing to '
                  f'resume.', file=sys.stderr)
        return 128 + int(e.signum)
    except StopNow as e:  # a second Ctrl-C: no state saved now, say which ones exist
        if os.environ.get('RANK', '0') != '0':
            return 128 + int(e.signum)
        if e.kept is None:
            print('\nInterrupted before any training state of this run was saved; run the same '
                  'command again to start over.', file=sys.stderr)
        else:
            print(f'\nInterrupted; kept: {e.kept}. Resume with: {resume_command()}',
                  file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:  # outside the training loop: nothing was being saved
        print(f'\nInterrupted. Resume with: {resume_command()}', file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a folder that vanished: say what, not where in the code
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


if __name__ == '__main__':
    sys.exit(main())
