"""The commands a run suggests, as lines to paste: the resume command, the teacher's when it is
missing, a quick run and the fast recipe's run on a CPU, and the grid's confirming run."""
import os
import shlex
import sys

from kd.methods.grid import setting_args
from kd.methods.registry import HYPER_PARAMETERS
from kd.report.tables import ranked_students, warmup_notes
from kd.run.config import flag_args

QUICK_RUN = ['--epochs', '3', '--subset', '2000']
# what a run's data and precision depend on, kept by every printed command
DATA_FLAGS = ('recipe', 'dataset', 'data_dir', 'image_size', 'val_fraction', 'split_seed', 'device',
              'amp')


def program():
    """How this program was started (`main.py`, or the path the user typed to it)."""
    argv0 = sys.argv[0] if sys.argv else ''
    return shlex.quote(argv0) if os.path.basename(argv0) == 'main.py' else 'main.py'


def _is_resume_or_restart(arg):
    # argparse also accepts an unambiguous prefix (--resu, --rest)
    return arg.startswith('--re') and ('--resume'.startswith(arg) or '--restart'.startswith(arg))


def resume_command():
    argv = [a for a in sys.argv[1:] if not _is_resume_or_restart(a)]
    nproc = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', '1')))
    launcher = f'torchrun --nproc_per_node={nproc}' if 'RANK' in os.environ else 'python'
    return ' '.join([launcher, program()] + [shlex.quote(a) for a in argv + ['--resume']])


def missing_teacher_message(config):
    """What to do when the students' teacher checkpoint does not exist: check the path given
    to --teacher-checkpoint, or train the teacher into --out-dir with this run's data flags."""
    if config.teacher_checkpoint_given:
        return (f'no teacher checkpoint at {config.teacher_checkpoint}: check the path given to '
                f'--teacher-checkpoint')
    flags = flag_args(config, DATA_FLAGS + ('subset', 'recipe', 'teacher_arch', 'out_dir'))
    return (f'no teacher checkpoint at {config.teacher_checkpoint}: train one first with '
            + ' '.join(['python', program(), '--train-teacher'] + [shlex.quote(f) for f in flags])
            + ', or give one with --teacher-checkpoint')


def command_lines(commands):
    """Each argument list of `commands` as a line to paste: python PROGRAM ARGS, quoted."""
    return [' '.join(['python', program()] + [shlex.quote(a) for a in c]) for c in commands]


def quick_run_commands(config, teacher_arch):
    """The commands of a quick run (3 epochs, 2,000 images) suggested on a CPU: into their own
    folder OUT_DIR/quick, so they run when pasted even with this run's unfinished state in
    OUT_DIR, with this run's data, dataset, split, device, precision and architectures. The
    students' phase gets the quick teacher's command first: its students need a teacher of the
    same data. Returns command lines (str)."""
    folder = os.path.normpath(os.path.join(config.out_dir, 'quick'))
    common = flag_args(config, DATA_FLAGS + ('batch_size',))
    arch = ['--teacher-arch', teacher_arch] if teacher_arch != config.recipe.teacher_arch else []
    commands = [['--train-teacher', *QUICK_RUN, *arch, *common, '--out-dir', folder]]
    if config.phase == 'students':
        commands.append([*QUICK_RUN, *flag_args(config, ('student_arch', 'teacher_points',
                                                          'student_points', 'loss', 'temperature',
                                                          'alpha', 'beta', 'gamma',
                                                          'logit_standardization', 'sets',
                                                          'no_baseline')),
                         *common, '--out-dir', folder])
    return command_lines(commands)


def fast_run_commands(config):
    """The commands of the same phase under the fast recipe (its own networks, 10 epochs), into
    OUT_DIR/fast, with this run's data, dataset, split, device, precision and, for the students,
    loss settings; the students' phase gets the fast teacher's command first. [] when the run
    already uses the fast recipe. Returns command lines (str)."""
    if config.recipe.name == 'fast':
        return []
    folder = os.path.normpath(os.path.join(config.out_dir, 'fast'))
    common = ['--recipe', 'fast', *flag_args(config, tuple(f for f in DATA_FLAGS if f != 'recipe')
                                                     + ('subset',)), '--out-dir', folder]
    commands = [['--train-teacher', *common]]
    if config.phase == 'students':
        commands.append([*flag_args(config, ('loss', *HYPER_PARAMETERS, 'sets', 'no_baseline')),
                         *common])
    return command_lines(commands)


def rerun_command(models, config):
    """For a grid: the setting best on validation, whether it beats the baseline there, notes on
    losses whose warm-up outlasted the run, and the command that confirms it over seeds.
    Returns the lines as one string, or None for fewer than two distilled settings."""
    distilled = [n for n in ranked_students(models) if n not in ('student_base', 'student_kd')]
    if len(distilled) < 2:
        return None
    best = models[distilled[0]]
    best_val = best.get('best_val_acc')
    if best_val is None:
        return ('No validation split (--val-fraction 0): nothing ranks the settings without '
                'the test set; run with a validation split to choose one.')
    lines = [f'Best on validation: {distilled[0]} ({best_val:.2f}%).']
    base_val = models.get('student_base', {}).get('best_val_acc')
    if base_val is not None and best_val <= base_val:
        lines.append(f'It does not beat the baseline on validation ({best_val:.2f}% against the '
                     f"baseline's {base_val:.2f}%).")
    epochs = config.epochs
    lines += warmup_notes({n: models[n] for n in distilled}, epochs)
    params = best.get('loss_params') or {}
    flags = ['--loss', best['loss']] + setting_args(best['loss'], params)
    # everything else that made this run's numbers, so the seeds confirm this very setting
    keep = ['--epochs', str(epochs)] + flag_args(
        config, DATA_FLAGS + ('subset', 'teacher_arch', 'student_arch', 'teacher_points',
                            'student_points', 'batch_size', 'lr', 'weight_decay',
                            'test_every', 'stack_students', 'compile')) + \
        ['--teacher-checkpoint', config.teacher_checkpoint,
         '--out-dir', os.path.normpath(os.path.join(config.out_dir, distilled[0]))]
    lines.append(f'Confirm it over seeds, paired with the baseline: python {program()} '
                 + ' '.join(shlex.quote(a) for a in flags + keep + ['--seeds', '0', '1', '2', '3',
                                                                     '4']))
    return '\n'.join(lines)
