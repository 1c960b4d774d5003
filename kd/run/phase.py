"""A training phase, once per seed, in named steps: plan the phase on the data (its models, run
folders, feature plan and memory), look up what --resume continues, decide the precisions,
prepare the students' teacher, claim the output folder, then train each seed and write its
records. What each step learns is added to the run's record.RunRecord (dataclasses.replace),
which every state file, results.json and the printed configuration derive from.
"""
import os
import shutil
from dataclasses import dataclass, replace
from typing import Callable, Optional

from kd.data.loader import make_loaders
from kd.engine.distributed import DistInfo
from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles, train_phase
from kd.engine.precision import PRECISION_DTYPES, precision_name
from kd.engine.stacked import StudentStack
from kd.engine.step import LockstepSteps, PhaseTeacher
from kd.engine.timing import Stopwatch
from kd.files.checkpoint import record_path
from kd.models.sizes import image_size_problem
from kd.recipes.prepare import loader_options
from kd.report.provenance import device_name
from kd.report.results import write_results
from kd.run.advice import cpu_run_advice
from kd.run.commands import fast_run_commands, quick_run_commands
from kd.run.config import UsageError
from kd.run.memory import GridTooLarge, check_memory, peak_memory_mb
from kd.run.model_records import promote_best_student, teacher_in_use, write_model_records
from kd.run.outdir import Manifest, planned_files, set_aside, write_manifest
from kd.run.record import DataDigests, Precisions
from kd.run.resume import (check_resume_data, describe_resume, find_states, load_states,
                           resumed_amp, run_dirs, saved_precisions)
from kd.run.specs import (GivenPoints, TraineeSetup, distilled_names, feature_plan,
                          make_trainees)
from kd.run.teacher import (logits_key, logits_path, save_test_logits, store_test_logits,
                            teacher_test_logits)
from kd.run.teacher_form import fastest_teacher
from kd.run.tensorboard_log import log_tensorboard, open_tensorboard
from kd.run.tuning import (PrecisionDecisions, Workload, decide_precisions, decide_stacking,
                           decisions_path, machine_key)


def run_info(config, device):
    """results.json's note of where the run read its data and what it ran on."""
    return {'data_dir': config.data_dir, 'subset': config.subset, 'device': device_name(device)}


@dataclass(frozen=True)
class PhasePlan:
    """What every seed of a phase shares, fixed before any timing."""
    specs: tuple                  # the phase's models (specs.phase_specs)
    dirs: dict                    # {seed: its run folder}
    first_data: object            # the first seed's loaders (loader.make_loaders)
    features: object              # the students' FeaturePlan; None without feature methods
    batch_shape: tuple            # one process's batch: the shape every timing uses
    dist: DistInfo
    arrays: object                # the DatasetArrays every seed's loaders read
    log: Callable                 # the main process's log (silent on the others)

    def loaders(self, config, device, seed):
        """The loaders of `seed` (the first seed's are first_data)."""
        if seed == config.seeds[0]:
            return self.first_data
        return seed_loaders(config, device, self.dist, self.arrays, seed)

    def workload(self, record):
        """The tuning.Workload the speed choices time."""
        return Workload(record.device, self.batch_shape, record.config.num_classes, self.dist)


@dataclass(frozen=True)
class TeacherRun:
    """The students' teacher as the seeds use it (model None in the teacher's phase)."""
    model: object = None          # in its inference form (teacher_form.fastest_teacher)
    test_logits: object = None    # its logits on this run's test images
    logits_reused: bool = True    # read from its stored file (nothing to store)
    logits_key: Optional[dict] = None


@dataclass(frozen=True)
class PhaseRun:
    """What the seeds of a phase train with, once the choices before training are made."""
    plan: PhasePlan
    teacher: TeacherRun
    saved: dict                   # resume.load_states's {seed: (path, state)}
    states: dict                  # the states --resume continues, by seed
    claim: 'FolderClaim'
    stop: object                  # the loop's StopSignal, or None


def seed_loaders(config, device, dist, arrays, seed):
    """The train / validation / test loaders of `seed` over `arrays`, this process's share."""
    return make_loaders(config.data_dir, config.batch_size, device, config.val_fraction,
                        seed, config.subset,
                        eval_batch_size=5000 if device.type == 'cuda' else 1000,
                        channels_last=True, rank=dist.rank, world_size=dist.world_size,
                        arrays=arrays, split_seed=config.split_seed, dataset=config.dataset,
                        **loader_options(config.recipe))


def train_phase_for_seeds(record, dist, arrays, stop=None, teacher=None, log=print):
    """Train record.config.phase once per seed (record: the run's record.RunRecord, its
    specs and teacher filled in; teacher: the students' teacher model). Returns ({seed:
    summary}, the run folders, the run's RunRecord as results.json records it)."""
    plan, record = plan_phase(record, dist, arrays, teacher, log)
    record, saved, states = look_up_resume(record, plan)
    record = decide_run_precisions(record, plan, teacher, saved)
    record, teacher_run = prepare_teacher(record, plan, teacher)
    claim = FolderClaim(record.config, plan, fresh=not states, log=log)
    if not teacher_run.logits_reused and dist.is_main:  # stored only now the run goes ahead
        store_test_logits(record.config.teacher_checkpoint, teacher_run.test_logits,
                          teacher_run.logits_key, plan.log)
    run = PhaseRun(plan, teacher_run, saved, states, claim, stop)
    summaries, record, manifest = train_seeds(run, record)
    finish_phase(record.config, plan, manifest, claim.writers)
    return summaries, plan.dirs, record


def check_image_sizes(archs, image_shape, num_classes):
    """A model that cannot run on the dataset's images is refused before any training
    (UsageError, one line naming the size)."""
    for arch in dict.fromkeys(archs):
        problem = image_size_problem(arch, image_shape, num_classes)
        if problem:
            raise UsageError(problem)


def plan_phase(record, dist, arrays, teacher, log):
    """The PhasePlan of record's phase, and the record with what the first seed's data and the
    memory check taught: the images' digests and the memory estimate. A grid too large for the
    memory is refused (UsageError)."""
    config, device, specs = record.config, record.device, record.specs
    main_log = log if dist.is_main else (lambda *_: None)
    data = seed_loaders(config, device, dist, arrays, config.seeds[0])
    dataset = config.dataset_spec()  # the image size comes from the dataset
    check_image_sizes([s.arch for s in specs] + ([record.teacher.arch] if record.teacher else []),
                      dataset.image_shape, config.num_classes)
    features = feature_plan(specs, teacher, record.teacher.arch, device, config.num_classes,
                            dataset.image_shape, GivenPoints.of(config)) \
        if config.phase == 'students' else None
    batch_shape = dataset.batch_shape(config.batch_size // dist.world_size)
    try:
        extra = {s.name: features.state_bytes(s.loss, s.params, s.arch, data.train.labels)
                 for s in specs} if features is not None else None
        memory_estimate = check_memory(specs, device, config.num_classes, batch_shape, main_log,
                                       extra)
    except GridTooLarge as e:
        raise UsageError(str(e)) from None
    plan = PhasePlan(specs, run_dirs(config.out_dir, list(config.seeds), config.per_seed_folders),
                     data, features, batch_shape, dist, arrays, main_log)
    # what the images are, whichever folder they were read from
    digests = DataDigests(data.val_fingerprint(), data.arrays.train_sha256,
                          data.arrays.test_sha256, data.normalization)
    return plan, replace(record, data=digests,
                         memory_estimate_mb=round(memory_estimate / 2**20, 1))


def look_up_resume(record, plan):
    """(record with the --amp a resumed run keeps, load_states's saved states, the states
    --resume continues by seed). Every refusal that needs no timing comes here, before any."""
    config, log = record.config, plan.log
    saved = load_states(config.phase, plan.dirs)
    if config.resume:
        check_resume_data(saved, plan.first_data.arrays, log)
    record = replace(record, amp=resumed_amp(saved, config.amp) if config.resume else config.amp)
    states = find_states(config.phase, saved, config.resume, config.restart,
                         {s: replace(record, seed=s).to_dict() for s in config.seeds})
    if config.resume and not states:
        log(f'--resume: no saved {config.phase} state in {config.out_dir}; starting from the '
            f'beginning')
    return record, saved, states


def decide_run_precisions(record, plan, teacher, saved):
    """The record with its Precisions: a resumed run's own, else tuning.decide_precisions's
    (measured or stored on a CPU in auto mode)."""
    config, log = record.config, plan.log
    resumed = saved_precisions(saved, config.resume)
    if resumed is not None:
        log(f"precision: {', '.join(sorted(set(resumed[0].values())))}, as the run being "
            f"resumed")
        return replace(record, precisions=Precisions(
            {n: PRECISION_DTYPES[p] for n, p in resumed[0].items()},
            PRECISION_DTYPES[resumed[1]] if resumed[1] else None,
            resumed[2]['source'], resumed[2]['decisions']))
    store = PrecisionDecisions(decisions_path(), machine_key(plan.dist.world_size), log) \
        if record.device.type == 'cpu' and config.amp is None else None
    precisions, teacher_precision, decided = decide_precisions(
        plan.specs, plan.workload(record), config.amp, teacher=teacher,
        teacher_arch=record.teacher.arch if record.teacher else None, store=store, log=log)
    return replace(record, precisions=Precisions(precisions, teacher_precision,
                                                 decided['source'], decided['decisions']))


def prepare_teacher(record, plan, teacher):
    """(record with the teacher's form, TeacherRun): the students' teacher's logits on this
    run's test images (stored or computed) and its inference form for the training forwards.
    The teacher's phase has none."""
    if record.config.phase != 'students':
        return record, TeacherRun()
    config, data, log = record.config, plan.first_data, plan.log
    precision = record.precisions.teacher
    key = logits_key(record.teacher.sha256, config.dataset, data.arrays.test_sha256,
                     data.num_test)
    logits, reused = teacher_test_logits(teacher, config.teacher_checkpoint, key, data.test,
                                         precision, log)
    forwards = config.epochs * len(data.train) * len(config.seeds)
    model, form = fastest_teacher(
        teacher, plan.batch_shape, record.device, precision, forwards, log,
        compile_model=bool(config.compile),
        points=plan.features.teacher_points if plan.features is not None else None)
    log(f"teacher: {form['chosen']} form for the training forwards "
        f"({', '.join(f'{k} {v:.3f}s' for k, v in form['seconds_per_batch'].items())}"
        f" per batch)")
    return replace(record, teacher_form=form), TeacherRun(model, logits, reused, key)


def phase_manifest(config, specs, dirs):
    """The outdir.Manifest of this run: its models, folders, planned files, --subset, dataset
    and seeds."""
    seeds = list(config.seeds)
    folders = [os.path.relpath(dirs[s], config.out_dir) for s in seeds]
    names = [s.name for s in specs] + (['student_kd'] if len(distilled_names(specs)) > 1
                                       else [])
    return Manifest(config.phase,
                    {s.name: {'arch': s.arch, 'loss': s.loss, 'params': s.params} for s in specs},
                    folders, planned_files(config.phase, names, folders,
                                           top_copies=config.per_seed_folders),
                    subset=config.subset, dataset=config.dataset, seeds=seeds)


class FolderClaim:
    """The loop's before_write of the first seed: called before this run's first file. A fresh
    run must not mix its files with an earlier run's, so that run's files are set aside; the
    manifest then names this run's, and the TensorBoard writer opens (its writers: the open
    ones, closed by finish_phase)."""

    def __init__(self, config, plan, fresh, log):
        self.config, self.plan, self.fresh, self.log = config, plan, fresh, log
        self.manifest = phase_manifest(config, plan.specs, plan.dirs)
        self.writers = []

    def __call__(self):
        config = self.config
        if self.fresh:
            keep = [] if config.phase == 'teacher' else [
                config.teacher_checkpoint, record_path(config.teacher_checkpoint),
                logits_path(config.teacher_checkpoint)]
            set_aside(config.out_dir, config.phase, keep=keep, log=self.plan.log)
        write_manifest(config.out_dir, self.manifest, finished=False)
        # set_aside removes the seed folders it empties
        os.makedirs(self.plan.dirs[config.seeds[0]], exist_ok=True)
        self.writers.extend(w for w in [open_tensorboard(config.out_dir, config.tensorboard,
                                                         config.phase, self.log)]
                            if w is not None)


@dataclass(frozen=True)
class SeedJob:
    """One seed of the phase: its place in the seeds, its loaders, trainees and record."""
    index: int
    seed: int
    data: object                  # loader.make_loaders's result
    trainees: list
    stacked: bool                 # the students train as one vmapped stack
    record: object                # the run's RunRecord with this seed


def train_seeds(run, record):
    """Train every seed of the phase in turn; returns ({seed: summary}, the record with its
    stacking decision, the outdir.Manifest as the run ends)."""
    config, plan = record.config, run.plan
    manifest, summaries = run.claim.manifest, {}
    setup = TraineeSetup(config.recipe, record.device, record.precisions.models,
                         config.num_classes, config.compile, plan.dist.enabled)
    for index, seed in enumerate(config.seeds):
        if plan.dist.is_main and index > 0:  # the first seed's is made by the claim
            os.makedirs(plan.dirs[seed], exist_ok=True)
        data = plan.loaders(config, record.device, seed)
        trainees = make_trainees(plan.specs, setup, seed, data.train, plan.features)
        if index == 0:
            stacked, stacking = decide_stacking(
                trainees, plan.workload(record), config.recipe, config.stack_students,
                config.compile, run.teacher.model, record.precisions.teacher, plan.log)
            record = replace(record, stacking=stacking)
        job = SeedJob(index, seed, data, trainees, stacked, replace(record, seed=seed))
        summaries[seed] = train_seed(run, job)
        best = write_seed_records(run, job, summaries[seed])
        if best is not None and index == 0:  # the top-level copy is the first seed's
            manifest = replace(manifest, models=dict(
                manifest.models, student_kd=dict(manifest.models[best], copy_of=best)))
    return summaries, record, manifest


def train_seed(run, job):
    """Train one seed (a SeedJob) with the loop; returns its summary, its wall time and peak
    memory added."""
    plan, record, data = run.plan, job.record, job.data
    config, precisions = record.config, record.precisions
    phase, seed, writers = config.phase, job.seed, run.claim.writers
    plan.log(f'[{phase}, seed {seed}] {data.num_train} training, {data.num_val} validation, '
             f'{data.num_test} test images; {len(data.train)} '
             f'step{"s" if len(data.train) != 1 else ""} per epoch; {len(job.trainees)} '
             f'model{"s" if len(job.trainees) != 1 else ""}, precision '
             + ', '.join(sorted({precision_name(p) for p in precisions.models.values()}))
             + (f', teacher {precision_name(precisions.teacher)}'
                if run.teacher.model is not None else ''))
    if seed in run.states and plan.dist.is_main:
        plan.log(describe_resume(seed, run.saved[seed][0], run.states[seed], len(data.train)))
    callback = (lambda epoch, rows, s=seed: [log_tensorboard(w, phase, s, epoch, rows)
                                             for w in writers]) \
        if config.tensorboard and plan.dist.is_main else None
    seed_watch = Stopwatch(record.device).start()
    if run.stop is not None:  # from here a signal stops at the next batch and saves the state
        run.stop.immediate = False
    first = job.index == 0
    advice = cpu_run_advice(record.device, quick_run_commands(
        config, plan.specs[0].arch if phase == 'teacher' else record.teacher.arch),
        fast_run_commands(config))
    summary = train_phase(
        phase, job.trainees, data, config.recipe,
        PhaseFiles(plan.dirs[seed], record, run.states.get(seed)),  # the state saves the record
        teacher=PhaseTeacher(run.teacher.model, precisions.teacher, run.teacher.test_logits),
        options=LoopOptions(record.device, plan.dist, test_every=config.test_every,
                            runs_ahead=len(config.seeds) if first else 0,
                            steps=StudentStack if job.stacked else LockstepSteps),
        callbacks=LoopCallbacks(log=plan.log, stop=run.stop, on_epoch=callback,
                                before_write=run.claim if first else None,
                                on_estimate=advice))
    summary['wall_seconds'] = round(seed_watch.elapsed(), 2)
    summary['peak_memory_mb'] = peak_memory_mb(record.device)
    return summary


def write_seed_records(run, job, summary):
    """A trained seed's records: each model's architecture and the teacher in use in its
    summary, best_<name>.json beside its weights, the teacher's test logits, the grid's best
    student promoted, the seed folder's results. Returns the promoted student's name or None."""
    plan, record, seed = run.plan, job.record, job.seed
    config, recorded = record.config, job.record.to_dict()
    test_logits = summary.pop('test_logits')
    for spec in plan.specs:
        summary['models'][spec.name]['arch'] = spec.arch
    if record.teacher is not None:  # the teacher as it ran, not as an earlier run reported it
        summary['models'].setdefault('teacher_in_use', {}).update(
            teacher_in_use(config.teacher_checkpoint, record.teacher))
    best = None
    if plan.dist.is_main:
        hashes = write_model_records(plan.dirs[seed], plan.specs, summary['models'], recorded)
        for name, sha256 in hashes.items():  # which weights the results describe
            summary['models'][name]['sha256'] = sha256
        if config.phase == 'teacher':  # the students' phase and --evaluate reuse them
            save_test_logits(os.path.join(plan.dirs[seed], 'best_teacher.pth'),
                             test_logits['teacher'], logits_key(
                                 hashes['teacher'], config.dataset,
                                 job.data.arrays.test_sha256, job.data.num_test))
        else:
            best = promote_best_student(plan.dirs[seed], plan.specs, summary['models'],
                                        plan.log)
    if config.per_seed_folders and plan.dist.is_main:
        write_results(plan.dirs[seed], config.phase, {seed: summary}, recorded,
                      run_info(config, record.device), {config.phase: [plan.dirs[seed]]},
                      log=lambda *_: None)
    return best


def finish_phase(config, plan, manifest, writers):
    """After the last seed: the TensorBoard writers closed, the first seed's best_* copied to
    OUT_DIR (with --seeds), the manifest marked finished."""
    for writer in writers:
        writer.close()
    if config.per_seed_folders and plan.dist.is_main:
        first = plan.dirs[config.seeds[0]]
        for name in os.listdir(first):  # the top-level files stay usable by the README's snippet
            if name.startswith('best_'):
                shutil.copyfile(os.path.join(first, name), os.path.join(config.out_dir, name))
    if plan.dist.is_main:
        write_manifest(config.out_dir, manifest, finished=True)
