"""Knowledge distillation on CIFAR-10: train a ResNet-18 teacher, then a distilled and a baseline student.

    python main.py --train-teacher                  # writes best_teacher.pth
    python main.py --temperature 4 --alpha 0.1      # writes best_student_kd.pth, best_student_base.pth
    python main.py --evaluate                       # test accuracy of the best_*.pth in --out-dir
"""
import argparse
import math
import os
import sys

from runner import UsageError, resume_command, run


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
    p = ArgumentParser(
        description='Knowledge distillation on CIFAR-10: a ResNet-18 teacher, a KD student and '
                    'a baseline student trained in lockstep on identical batches.',
        epilog='Loss of the KD student: alpha*CE(student, labels) + (1-alpha)*T^2*'
               'KL(softmax(teacher/T) || softmax(student/T)). alpha weights the HARD LABELS: '
               'alpha=0.1 puts 0.9 on the teacher.')
    a = p.add_argument
    a('--train-teacher', action='store_true',
      help='train the teacher and write best_teacher.pth (default: train the students)')
    a('--evaluate', action='store_true',
      help='evaluate the best_*.pth found in --out-dir on the test set and print the table '
           '(default: off)')
    a('--epochs', type=positive_int, default=200, help='epochs per model (default: 200)')
    a('--batch-size', type=positive_int, default=128,
      help='global batch size, the same whatever the number of torchrun processes (default: 128)')
    a('--lr', type=finite_float, default=None,
      help='peak learning rate (default: 0.1 * batch-size / 128)')
    a('--weight-decay', type=finite_float, default=5e-4, help='weight decay (default: 5e-4)')
    a('--temperature', type=finite_float, default=4.0, help='KD temperature T > 0 (default: 4.0)')
    a('--alpha', type=finite_float, default=0.1,
      help='weight of the hard-label CE in [0, 1]; the teacher gets 1 - alpha (default: 0.1)')
    a('--seed', type=int, default=0,
      help='seed of initialization, validation split, order and augmentation (default: 0)')
    a('--seeds', type=int, nargs='+', default=None, metavar='N',
      help='run once per seed into OUT_DIR/seed<N>/ and aggregate (mean, std, paired KD gain '
           'with 95%% CI); top-level best_*.pth are the first seed\'s (default: off, one --seed)')
    a('--data-dir', default='./data',
      help='folder holding cifar-10-batches-py, or where to download it (default: ./data)')
    a('--out-dir', default='.', help='where checkpoints, logs and results go (default: .)')
    a('--device', default='auto',
      help='auto, cpu, cuda or cuda:N (default: auto = cuda when available)')
    a('--subset', type=positive_int, default=None, metavar='N',
      help='use only the first N training and the first N test images, for quick CPU runs; '
           'results say so (default: all)')
    a('--val-fraction', type=finite_float, default=0.1,
      help='share of the training images held out to select the best epoch; 0 trains on all '
           'and keeps the last epoch (default: 0.1)')
    a('--split-seed', type=int, default=0,
      help='which images are held out: the same for the teacher and every student seed, so the '
           'students select on images the teacher never trained on (default: 0)')
    a('--no-baseline', action='store_true',
      help='train only the KD student, not the baseline student (default: train both)')
    a('--teacher-checkpoint', default=None,
      help='teacher weights for the students (default: OUT_DIR/best_teacher.pth)')
    a('--num-workers', type=int, default=2,
      help='unused, kept so reference commands still run: the data lives in device memory and '
           'is augmented in batches there, with no DataLoader workers (default: 2)')
    a('--amp', action=argparse.BooleanOptionalAction, default=None,
      help='mixed precision: bf16 autocast (fp16 on GPUs without bf16). Default: on for CUDA; '
           'on CPU only for the teacher on CPUs with bf16 instructions (default: auto)')
    a('--compile', action='store_true', help='torch.compile the models (default: off)')
    a('--resume', action='store_true',
      help='continue the unfinished run whose state (last_<phase>.pt) is in --out-dir '
           '(default: off)')
    a('--restart', action='store_true',
      help='discard an unfinished run\'s state in --out-dir and start over (default: off)')
    a('--tensorboard', action='store_true',
      help='also write the per-epoch scalars to OUT_DIR/tensorboard (default: off)')
    return p


def validate(args):
    """Raise UsageError for values argparse's types cannot judge alone."""
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f'--alpha must be in [0, 1], got {args.alpha}')
    if args.temperature <= 0:
        raise UsageError(f'--temperature must be > 0, got {args.temperature}')
    if args.lr is not None and args.lr < 0:
        raise UsageError(f'--lr must be >= 0, got {args.lr}')
    if args.weight_decay < 0:
        raise UsageError(f'--weight-decay must be >= 0, got {args.weight_decay}')
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f'--val-fraction must be in [0, 1), got {args.val_fraction}')
    if args.seed < 0 or any(s < 0 for s in args.seeds or []):
        raise UsageError('--seed and --seeds must be >= 0')
    if args.split_seed < 0:
        raise UsageError(f'--split-seed must be >= 0, got {args.split_seed}')
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise UsageError('--seeds must not repeat a seed')
    if args.resume and args.restart:
        raise UsageError('--resume and --restart exclude each other')
    if args.evaluate and args.train_teacher:
        raise UsageError('--evaluate and --train-teacher exclude each other')


def main(argv=None):
    from checkpoint import CheckpointError
    from distributed import shutdown_distributed
    from train import NonFiniteLoss, TrainingInterrupted
    from utils import DataError
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        return run(args)
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
    except KeyboardInterrupt:
        print('\nInterrupted; the state of the last finished epoch is kept. Resume with: '
              f'{resume_command()}', file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a folder that vanished: say what, not where in the code
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


if __name__ == '__main__':
    sys.exit(main())
