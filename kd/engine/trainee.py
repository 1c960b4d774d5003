"""A model being trained (Trainee): its module as the loop calls it (synchronised BatchNorm and
DDP over torchrun, torch.compile), its optimizer, precision, loss and a feature method's
distiller, trained and saved with it."""
import inspect
from dataclasses import dataclass

import torch

from kd.engine.distributed import sync_batchnorm
from kd.engine.precision import autocast
from kd.methods.registry import get_loss
from kd.models.features import FeatureCapture
from kd.recipes.lookahead import Lookahead
from kd.recipes.optim import make_optimizer


def no_buffer_sync_argument():
    """DDP's argument that skips broadcasting buffers before every forward: synchronised
    BatchNorm already keeps them equal on every rank. (Renamed in newer PyTorch.)"""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    if 'forward_sync_buffers' in params:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}


@dataclass(frozen=True)
class TraineeOptions:
    """How a Trainee trains beyond its model, loss, recipe, device and precision."""
    loss_params: dict = None  # the loss's hyper-parameters (None: LOSSES[loss].defaults)
    distiller: torch.nn.Module = None  # a feature method's module (kd.methods.plan)
    points: dict = None       # {name: spec} of the student's feature points the distiller reads
    ddp: bool = False         # torchrun: synchronised BatchNorm, gradients reduced by DDP
    compile_model: bool = False  # --compile: torch.compile the forwards


class Trainee:
    """A model being trained: its plain module, what the loop calls, optimizer, precision, loss.

    loss is a name from kd.methods.registry.LOSSES ('ce' for the baseline, 'kd', 'dkd', 'ls', ...);
    options.loss_params its hyper-parameters (default: the loss's own, LOSSES[loss].defaults,
    as on the command line: kd T=4 alpha=0.1, ls T=2 alpha=0.1). The recipe gives the
    optimizer (recipe.make_optimizer), the label smoothing of the hard-label term and the
    lookahead averaging (None without it).
    """

    def __init__(self, name, module, loss, recipe, device, precision=None,
                 options=TraineeOptions()):
        self.name, self.precision = name, precision
        self.loss = get_loss(loss)
        params = options.loss_params
        self.loss_params = dict(params if params is not None else self.loss.defaults)
        self.module = module.to(device, memory_format=torch.channels_last)
        # a feature method's module (kd.methods.plan): trained, synchronised and saved with the
        # student, never part of best_*.pth (self.module stays the plain student)
        distiller = options.distiller
        self.distiller = distiller.to(device) if distiller is not None else None
        if options.ddp:
            self.module = sync_batchnorm(self.module, device)
            if self.distiller is not None:
                self.distiller = sync_batchnorm(self.distiller, device)
        self.train_model = self._train_model(device, options)
        self.eval_model = torch.compile(self.module) if options.compile_model else self.module
        self.optimizer = make_optimizer(self.module, recipe, extra=(
            self.distiller.parameters() if self.distiller is not None else ()))
        self.label_smoothing = recipe.label_smoothing
        self.lookahead = Lookahead(self.module) if recipe.lookahead_every else None
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None

    def _train_model(self, device, options):
        """What a training step calls: the module, with its distiller, under DDP, compiled."""
        model = self.module
        if self.distiller is not None:
            # one module for DDP: the distiller's parameters are reduced with the student's;
            # --compile compiles the student's forward inside it (the hooks compile with it)
            model = StudentWithDistiller(
                self.module, self.distiller, options.points,
                torch.compile(self.module) if options.compile_model else None)
        if options.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None,
                **no_buffer_sync_argument())
        compile_whole = options.compile_model and self.distiller is None
        return torch.compile(model) if compile_whole else model

    def compute_loss(self, logits, teacher_logits, labels, epoch):
        smoothing = {'label_smoothing': self.label_smoothing} if self.label_smoothing else {}
        return self.loss.fn(logits, teacher_logits, labels, epoch=epoch, **smoothing,
                            **self.loss_params)

    def forward_loss(self, images, labels, teacher_out, batch, epoch):
        """(logits, loss, parts) of one training forward: the student and its loss, logit or
        feature method alike."""
        if self.distiller is None:
            with autocast(images.device, self.precision):
                logits = self.train_model(images)
            return (logits,) + tuple(self.compute_loss(logits, teacher_out.logits, labels, epoch))
        return self.train_model(images, labels, teacher_out, batch, epoch, self.precision,
                                self.label_smoothing)


class StudentWithDistiller(torch.nn.Module):
    """A student and its feature method's Distiller as one module, so DDP wraps (and reduces the
    gradients of) both: forward runs the student with its feature points hooked, then the
    distiller's loss. points: {name: spec} of the student's points the distiller reads;
    compiled: torch.compile(student), run instead of the student (the hooks compile with it)."""

    def __init__(self, student, distiller, points, compiled=None):
        super().__init__()
        self.student, self.distiller = student, distiller
        self.capture = FeatureCapture(student, {k: points[k] for k in distiller.student_points})
        # not a submodule: the student's parameters must appear once (to DDP, to state_dict)
        object.__setattr__(self, '_forward', compiled if compiled is not None else student)

    def forward(self, images, labels, teacher_out, batch, epoch, precision, label_smoothing):
        with autocast(images.device, precision), self.capture:
            logits = self._forward(images)
        loss, parts = self.distiller(logits, teacher_out.logits, labels,
                                     student_feats=self.capture.pop(),
                                     teacher_feats=teacher_out.feats, batch=batch, epoch=epoch,
                                     label_smoothing=label_smoothing)
        return logits, loss, parts
