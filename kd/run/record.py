"""The run record: one frozen object holding the RunConfig and what the run learned on the way
(the images' digests, the teacher it loaded, the memory estimate, the precisions decided or kept,
the teacher's inference form, whether the students stack, the device and processes).

It is built once when the run starts (RunRecord.start) and grows by dataclasses.replace as the
run learns, never by mutation. Its three views come from it alone: the printed 'Configuration:'
(configuration()), the 'config' saved in every training state, and results.json's config
(to_dict(), the same keys and values as the files written before it existed, so RUN_KEYS
compares old states with new runs unchanged).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from kd.engine.precision import precision_name
from kd.models import source_sha256
from kd.run.config import RunConfig
from kd.run.configuration import loss_settings, resolved_configuration


@dataclass(frozen=True)
class TeacherInfo:
    """The students' teacher as loaded (teacher.load_teacher)."""
    arch: str
    sha256: str                   # of the checkpoint's weights
    params: int                   # its parameter count
    record: Optional[dict] = None  # its best_teacher.json, None when it has none


@dataclass(frozen=True)
class DataDigests:
    """What the images are, whichever folder they were read from (datasets.content_sha256)."""
    val: Optional[str]            # the validation split's fingerprint (loader.val_fingerprint)
    train: str
    test: str
    normalization: Optional[tuple] = None  # (mean, std) computed from the training images


@dataclass(frozen=True)
class Precisions:
    """The autocast dtypes a run trains in (None: fp32), and how they were decided."""
    models: dict                  # {model name: dtype}
    teacher: Optional[torch.dtype]  # the students' teacher's inference dtype
    source: str                   # tuning.decide_precisions's record, or 'resumed (...)'
    decisions: Optional[dict]


@dataclass(frozen=True)
class RunRecord:
    """The RunConfig of a run, and what it learned: `amp` starts as --amp; the fields after it
    are None until the run has learned them (to_dict leaves the precisions, the teacher's
    form, the seed and the stacking out while they are None)."""
    config: RunConfig
    device: torch.device
    world_size: int = 1           # torchrun processes
    specs: tuple = ()             # specs.phase_specs's models (none for --evaluate)
    teacher: Optional[TeacherInfo] = None  # the students' teacher
    amp: Optional[bool] = None    # --amp as recorded: a resumed run's own (resume.resumed_amp)
    data: Optional[DataDigests] = None
    memory_estimate_mb: Optional[float] = None
    precisions: Optional[Precisions] = None
    teacher_form: Optional[dict] = None  # teacher_form.fastest_teacher's record
    seed: Optional[int] = None    # one seed's record
    stacking: Optional[dict] = None  # tuning.decide_stacking's record
    sources: Optional[dict] = None  # {architecture: sha256 of the user's file it names}

    @classmethod
    def start(cls, config, device, world_size=1, specs=(), teacher=None):
        """The record of a run about to start: nothing learned yet, --amp as given; the content
        of the user's files its architectures name read now (external.source_sha256), so a
        file changed during or after the run is told apart."""
        archs = {s.arch for s in specs} | ({teacher.arch} if teacher else set())
        sources = {a: source_sha256(a) for a in sorted(archs)}
        return cls(config=config, device=device, world_size=world_size, specs=tuple(specs),
                   teacher=teacher, amp=config.amp,
                   sources={a: d for a, d in sources.items() if d} or None)

    def configuration(self):
        """The printed configuration (configuration.resolved_configuration), as this record
        resolves it (the effective --subset once the data is read)."""
        return resolved_configuration(self.config, self.device, self.world_size,
                                      list(self.specs) or None,
                                      self.teacher.arch if self.teacher else None)

    def _recipe_values(self):
        """The recipe's values as they ran: a dataset that scales the crop's padding with its
        images (Tiny-ImageNet, image folders: an eighth of the side) records the padding used."""
        values = self.config.recipe.to_dict()
        values['crop_padding'] = self.config.dataset_spec().crop_padding(values['crop_padding'])
        return values

    def to_dict(self):
        """The record as saved in training states and results.json: {key: value}, JSON-ready,
        in the order written before this object existed (needs the data's digests)."""
        config = self.config
        out = config.record()
        out.update(amp=self.amp, configuration=self.configuration(), device=str(self.device),
                   world_size=self.world_size, val_images_sha256=self.data.val,
                   train_images_sha256=self.data.train, test_images_sha256=self.data.test,
                   memory_estimate_mb=self.memory_estimate_mb, recipe=config.recipe.name,
                   recipe_values=self._recipe_values())
        if self.data.normalization is not None:  # a dataset that declares none (not CIFAR)
            mean, std = self.data.normalization
            out['normalization'] = {'mean': list(mean), 'std': list(std)}
        out.update(self._models())
        if self.precisions is not None:
            out.update(precision={n: precision_name(p)
                                  for n, p in self.precisions.models.items()},
                       precision_source=self.precisions.source,
                       precision_decisions=self.precisions.decisions)
            if config.phase == 'students':
                out['teacher_precision'] = precision_name(self.precisions.teacher)
        if self.teacher_form is not None:
            out['teacher_form'] = self.teacher_form
        if self.seed is not None:
            out['seed'] = self.seed
        if self.stacking is not None:
            out['stacking'] = self.stacking
        return out

    def _models(self):
        """The keys naming the phase's models: the teacher's architecture, or the students',
        their losses' settings and their teacher."""
        config, specs = self.config, self.specs
        if config.phase == 'teacher':
            return {'teacher_arch': specs[0].arch, **self._source('teacher', specs[0].arch)}
        distilled = [s for s in specs if s.name != 'student_base']
        # every loss's resolved settings; one setting also as its T and alpha (those it takes)
        out = dict(distilled[0].params) if len(distilled) == 1 else {}
        out.update(
            student_arch=specs[0].arch, loss=list(config.loss),
            loss_settings=loss_settings(specs), no_baseline=config.no_baseline,
            students=[{'name': s.name, 'loss': s.loss, 'params': s.params} for s in specs],
            teacher_checkpoint=config.teacher_checkpoint, teacher_arch=self.teacher.arch,
            teacher_sha256=self.teacher.sha256)
        out.update(self._source('student', specs[0].arch))
        out.update(self._source('teacher', self.teacher.arch))
        for who in ('teacher', 'student'):  # the points given by module path, when given
            if getattr(config, f'{who}_points'):
                out[f'{who}_points'] = list(getattr(config, f'{who}_points'))
        return out

    def _source(self, who, arch):
        """{'<who>_arch_sha256': the content of the user's file `arch` names} ({} for a
        registered or library model): written only where there is one, so the records of
        registered models are as before."""
        digest = (self.sources or {}).get(arch)
        return {f'{who}_arch_sha256': digest} if digest else {}
