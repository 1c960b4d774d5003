"""What each distillation method costs per training step on a teacher -> student pair.

    python bench/methods_bench.py [--teacher resnet32x4] [--student resnet8x4] [--classes 100]
                                  [--batch-size 64] [--steps 3] [--device auto] [--json FILE]

For every registered loss (the baseline `ce` first), times one training step of one student
with that loss, as train.train_step takes it in a run: the student's forward with its feature
hooks, the method's term (connectors, memories), backward and the optimizer step. The teacher's
forward (its folded form, returning the points the methods read) is timed once on its own, as a
run pays it once per batch whatever the number of students. A method the pair cannot use (kdsvd
on stages of other channel counts, ofd on a teacher without named BatchNorms) is listed with the
reason it is refused. Prints seconds per step and the
cost against the baseline's step, and writes --json. Random images of the run's shape, float32:
nothing is read from disk.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kd.data.datasets import CIFAR10  # noqa: E402
from kd.methods.plan import plan_features  # noqa: E402
from kd.methods.registry import LOSSES  # noqa: E402
from kd.models import build_model, feature_points  # noqa: E402
from kd.recipes import get_recipe  # noqa: E402
from kd.report.provenance import cpu_identity  # noqa: E402
from kd.run.device import device_arg  # noqa: E402
from kd.engine.timing import seconds_per_call  # noqa: E402
from kd.engine.trainee import Trainee  # noqa: E402
from kd.engine.step import train_step  # noqa: E402
from kd.engine.trainee import TraineeOptions  # noqa: E402
from kd.run.teacher_form import fold_batchnorm  # noqa: E402
from kd.data.loader import Batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher', default='resnet32x4', help='(default: resnet32x4)')
    p.add_argument('--student', default='resnet8x4', help='(default: resnet8x4)')
    p.add_argument('--classes', type=int, default=100, help='(default: 100)')
    p.add_argument('--batch-size', type=int, default=64,
                   help='(default: 64, the reference recipe\'s)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per method (default: 3)')
    p.add_argument('--train-size', type=int, default=45000,
                   help='training images CRD\'s memory holds (default: 45000)')
    p.add_argument('--device', default='auto', type=device_arg,
                   help='auto, cpu, cuda or cuda:N (default: auto)')
    p.add_argument('--json', default=None, help='where to write the results (default: none)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    teacher = build_model(args.teacher, args.classes).eval().to(device)
    points = feature_points(args.teacher, teacher)
    methods = [n for n in LOSSES if n != 'ce']
    plans, refused = {}, {}
    for name in methods:  # one plan per method: a pair one method cannot use still times the rest
        try:
            plans[name] = plan_features([(args.student, name, build_model(args.student,
                                                                          args.classes))],
                                        teacher, points, device, args.classes,
                                        teacher_arch=args.teacher)
        except ValueError as e:
            refused[name] = str(e)
    teacher_points = {k: v for plan in plans.values() if plan for k, v in
                      plan.teacher_points.items()}
    labels_of_all = torch.arange(args.train_size, device=device) % args.classes
    form = fold_batchnorm(teacher, teacher_points)
    images = torch.randn(CIFAR10.batch_shape(args.batch_size), device=device)
    index = torch.randint(0, args.train_size, (args.batch_size,), device=device)
    labels = labels_of_all[index]
    batch = Batch(images, labels, index, 0, 1, 0, index, 0)
    recipe = get_recipe('standard')

    with torch.no_grad():
        teacher_seconds = seconds_per_call(lambda: form(images), device, args.steps, warmup=1)
    results = {}
    for name in ['ce'] + methods:
        if name in refused:
            print(f'{name:<10} refused: {refused[name]}', flush=True)
            continue
        student = build_model(args.student, args.classes)
        spec, plan = LOSSES[name], plans.get(name)
        distiller = plan.build(name, {}, args.student, labels_of_all) if plan else None
        trainee = Trainee(name, student, name, recipe, device, options=TraineeOptions(
            distiller=distiller, points=plan.student_points[args.student] if plan else None))
        with torch.no_grad():
            out = form(images)
        # the teacher's outputs are given precomputed: only the student's side is timed
        frozen = (lambda o: lambda x: o)(out)
        results[name] = seconds_per_call(
            lambda: train_step([trainee], frozen, images, labels, recipe, batch=batch,
                               epoch=spec.warmup_epochs + 1), device, args.steps, warmup=1)
        print(f'{name:<10} {results[name]:8.3f} s/step  {results[name] / results["ce"]:5.2f}x',
              flush=True)
    if device.type == 'cuda':
        where = torch.cuda.get_device_name(device)
    else:
        model, flags = cpu_identity()
        wide = [f for f in ('avx512f', 'avx512_bf16', 'amx_tile') if f in flags.split()]
        where = f"{model} ({', '.join(wide) if wide else 'no AVX512'})"
    print(f'{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch_size}, '
          f'float32, {where}, torch {torch.__version__}, {torch.get_num_threads()} threads; the '
          f"teacher's forward {teacher_seconds:.3f} s per batch, once for all students")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': where, 'teacher': args.teacher, 'student': args.student,
                       'batch_size': args.batch_size, 'teacher_seconds': teacher_seconds,
                       'seconds_per_step': results, 'refused': refused}, f, indent=2)
            f.write('\n')


if __name__ == '__main__':
    main()
