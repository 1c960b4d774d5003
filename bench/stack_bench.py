"""Many students at once: one distilled student, a grid in a loop, and the same grid stacked.

    python bench/stack_bench.py [--device auto] [--students 7] [--batch-size 128] [--steps 5]

Times training steps (teacher forward included, as in a run) on random images of the run's
shape, with the precision a run would use on the device (CUDA: bf16 or fp16 by GPU; CPU: the
faster of fp32 and bf16, measured): one KD student alone; `--students` students (one baseline,
the rest KD) one after another, as train.train_step does; and the same students as one
torch.func.vmap computation (stacked.StudentStack). Prints seconds per step, images/s (images x
students per second) and how much a grid step costs against a single student's step, and
writes --json. Nothing is read from disk: it needs no data.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kd.data.datasets import CIFAR10  # noqa: E402
from kd.models import StudentNet, TeacherNet  # noqa: E402
from kd.run.device import device_arg  # noqa: E402
from kd.engine.stacked import StudentStack  # noqa: E402
from kd.engine.timing import seconds_per_call  # noqa: E402
from kd.recipes.base import Recipe
from kd.engine.trainee import Trainee
from kd.engine.precision import choose_precision, precision_name
from kd.engine.step import train_step, train_step_stacked
from kd.run.teacher_form import fold_batchnorm  # noqa: E402
from kd.run.tuning import measure_precisions, precision_from_rates  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='auto', type=device_arg,
                   help='auto, cpu, cuda or cuda:N (default: auto)')
    p.add_argument('--students', type=int, default=7,
                   help='students in the grid, the baseline included (default: 7)')
    p.add_argument('--batch-size', type=int, default=128, help='(default: 128)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per way (default: 5)')
    p.add_argument('--json', default=None, help='where to write the results (default: none)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    shape = CIFAR10.batch_shape(args.batch_size)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        precision = choose_precision('student', device)
        teacher_precision = precision
    else:
        precision = precision_from_rates(measure_precisions(StudentNet(), shape, device, True))
        teacher_precision = precision_from_rates(
            measure_precisions(TeacherNet().eval(), shape, device, False))
    recipe = Recipe(epochs=1)
    torch.manual_seed(0)
    teacher = fold_batchnorm(TeacherNet().eval()).to(device, memory_format=torch.channels_last)
    images = torch.randn(shape).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,)).to(device)

    def students(n):
        torch.manual_seed(0)
        return [Trainee(f's{i}', StudentNet(), 'ce' if i == n - 1 and n > 1 else 'kd', recipe,
                        device, precision) for i in range(n)]

    def timed(step):
        return seconds_per_call(step, device, args.steps, warmup=2)

    one = students(1)
    grid = students(args.students)
    stack = StudentStack(students(args.students), recipe)
    results = {
        'single student': timed(
            lambda: train_step(one, teacher, images, labels, recipe, teacher_precision)),
        f'{args.students} students, loop': timed(
            lambda: train_step(grid, teacher, images, labels, recipe, teacher_precision)),
        f'{args.students} students, stacked': timed(
            lambda: train_step_stacked(stack, teacher, images, labels, teacher_precision)),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'device {device_name}; batch {args.batch_size}; precision students '
          f'{precision_name(precision)}, teacher {precision_name(teacher_precision)}; '
          f'torch {torch.__version__}')
    print(f"{'':<24} {'s/step':>9} {'student-images/s':>17} {'vs single':>10}")
    single = results['single student']
    for name, seconds in results.items():
        n = 1 if name == 'single student' else args.students
        print(f'{name:<24} {seconds:9.4f} {n * args.batch_size / seconds:17.0f} '
              f'{seconds / single:9.2f}x')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': device_name, 'batch_size': args.batch_size,
                       'precision': precision_name(precision),
                       'seconds_per_step': results}, f, indent=2)
            f.write('\n')


if __name__ == '__main__':
    main()
