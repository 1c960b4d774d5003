"""How fast this machine can run the fast recipe at all: its matrix-multiply peak, the recipe's
training and inference steps against it, and the least time the fast workflow can take here.

    python bench/roofline.py [--device cpu] [--json bench/roofline_results.json]

(a) peak: the throughput of a 4096 x 4096 x 4096 matrix product (--matrix) in bfloat16 and in
    float32 (FLOP/s, 2 per multiply-accumulate), the best the math library does on this device;
(b) the fast recipe's steps at its batch (1,024, channels_last, bf16 autocast where the device
    has it, train.train_step with the recipe's optimizer, lookahead left out): training of the
    teacher (airbench94) and the student (airbench94_small), and the teacher's inference (the
    forward each students' step pays); images/s, and FLOP/s from the models' multiply-
    accumulates (a training step counted as 3 forwards) as a fraction of (a)'s bf16 peak;
(c) the floors that follow, for all 50,000 training images and 10 epochs, evaluation left out:
    the teacher's training, and one seed of KD + baseline students (two students' training and
    one teacher forward per batch), at (b)'s rates and at (a)'s peak.

Each figure is the median of --repeats timed calls after two of warm-up, on one fixed batch.
The machine (CPU model, cores, threads, load average) is printed with the figures; run it on a
quiet machine. A table on stdout and --json.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import torch  # noqa: E402

from bench import machine_info  # noqa: E402
from kd.data.datasets import CIFAR10  # noqa: E402
from kd.models import build_model, count_macs  # noqa: E402
from kd.recipes import get_recipe, prepare_model  # noqa: E402
from kd.engine.timing import seconds_per_call  # noqa: E402
from kd.engine.trainee import Trainee  # noqa: E402
from kd.engine.precision import choose_precision  # noqa: E402
from kd.engine.step import teacher_forward, train_step  # noqa: E402

IMAGES, EPOCHS = 50_000, 10  # CIFAR-10's training set, the fast recipe's epochs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default: cpu)')
    p.add_argument('--repeats', type=int, default=5,
                   help='timed calls per figure, the median reported (default: 5)')
    p.add_argument('--batch-size', type=int, default=None,
                   help='images per step (default: the fast recipe\'s, 1024)')
    p.add_argument('--matrix', type=int, default=4096,
                   help='side of the square matrices of (a) (default: 4096)')
    p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'roofline_results.json'),
                   help='where to write the results (default: bench/roofline_results.json)')
    return p.parse_args(argv)


def median_seconds(fn, device, repeats):
    """The median seconds of one call of fn over `repeats` calls, each timed alone (the device
    synchronised around it), after two warm-up calls."""
    seconds_per_call(fn, device, repeats=1, warmup=1)
    return statistics.median(seconds_per_call(fn, device) for _ in range(repeats))


def matmul_flops(dtype, device, repeats, n):
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, repeats)


def step_rates(arch, recipe, device, precision, repeats):
    """(training images/s, inference images/s) of `arch` under `recipe` on one fixed batch of
    recipe.batch_size images."""
    torch.manual_seed(0)
    batch = recipe.batch_size
    images = torch.randn(CIFAR10.batch_shape(batch), device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    module = build_model(arch)
    if recipe.freeze_norm_scales:
        module.freeze_norm_scales()
    trainee = Trainee(arch, module, 'ce', recipe, device, precision)
    trainee.lookahead = None  # a copy every 5 steps: not the arithmetic this measures
    train = median_seconds(lambda: train_step([trainee], None, images, labels, recipe), device,
                           repeats)
    model = trainee.module.eval()
    infer = median_seconds(lambda: teacher_forward(model, images, precision), device, repeats)
    return batch / train, batch / infer


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    recipe = get_recipe('fast')
    if args.batch_size:
        recipe = replace(recipe, batch_size=args.batch_size)
    precision = choose_precision(recipe.teacher_arch, device, amp=True)
    peak = {str(dtype).replace('torch.', ''): matmul_flops(dtype, device, args.repeats,
                                                           args.matrix)
            for dtype in (torch.bfloat16, torch.float32)}
    top = peak['bfloat16']
    models = {}
    for arch in (recipe.teacher_arch, recipe.student_arch):
        macs = count_macs(prepare_model(build_model(arch), recipe, None))
        train, infer = step_rates(arch, recipe, device, precision, args.repeats)
        # the rates unrounded: the fractions and floors below, and anyone checking them, derive
        # from these (rounding 8 images/s to 0.1 moves a floor by minutes on a slow CPU)
        models[arch] = {'macs': macs, 'train_images_per_s': train,
                        'inference_images_per_s': infer,
                        'train_fraction_of_peak': round(train * 6 * macs / top, 3),
                        'inference_fraction_of_peak': round(infer * 2 * macs / top, 3)}
    t, s = models[recipe.teacher_arch], models[recipe.student_arch]
    work = IMAGES * EPOCHS
    floors = {
        'teacher_seconds': work / t['train_images_per_s'],
        'teacher_seconds_at_peak': work * 6 * t['macs'] / top,
        'students_seconds_per_seed': work * (1 / t['inference_images_per_s']
                                             + 2 / s['train_images_per_s']),
        'students_seconds_per_seed_at_peak': work * (2 * t['macs'] + 2 * 6 * s['macs']) / top}
    results = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               'command': ' '.join(['python', 'bench/roofline.py'] + (argv or sys.argv[1:])),
               'machine': machine_info(device), 'precision': str(precision),
               'peak_flops': {k: round(v) for k, v in peak.items()}, 'models': models,
               'floors': {k: round(v, 1) for k, v in floors.items()}}
    m = results['machine']
    print(f"{m['gpu'] or m['cpu']} ({m['cpu_count']} logical cores, torch threads "
          f"{m['torch_threads']}), torch {m['torch']}, load average "
          f"{' '.join(f'{x:.2f}' for x in m.get('load_average') or [])}")
    print(f"(a) matrix-multiply peak: bf16 {peak['bfloat16'] / 1e9:,.0f} GFLOP/s, "
          f"fp32 {peak['float32'] / 1e9:,.0f} GFLOP/s")
    print(f"(b) batch {recipe.batch_size}, {results['precision']} autocast, channels_last:")
    for arch, r in models.items():
        print(f"    {arch:<17} {r['macs'] / 1e6:6.1f} M MACs  training {r['train_images_per_s']:7.0f}"
              f" images/s ({r['train_fraction_of_peak']:.0%} of peak)  inference "
              f"{r['inference_images_per_s']:7.0f} images/s ({r['inference_fraction_of_peak']:.0%})")
    print(f"(c) {EPOCHS} epochs of {IMAGES:,} images, evaluation left out:")
    print(f"    teacher training        {floors['teacher_seconds'] / 60:5.1f} min at (b)'s rate, "
          f"{floors['teacher_seconds_at_peak'] / 60:5.1f} min at the peak")
    print(f"    KD + baseline, a seed   {floors['students_seconds_per_seed'] / 60:5.1f} min at "
          f"(b)'s rates, {floors['students_seconds_per_seed_at_peak'] / 60:5.1f} min at the peak")
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
