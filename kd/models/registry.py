"""The model registry and what every family of networks shares: register_model / build_model,
feature points by name, the float32 classifier and the reference initialisation.

Feature points. Feature distillers (FitNets, AT, CRD, ...) read intermediate tensors by name:
'stem' (the stem's output), 'stage1'..'stageN' (each stage's output), 'stage1_pre'..'stageN_pre'
(each stage's pre-activation output) and 'pooled' (the embedding the classifier takes): the
reference code's `feats[0]`, `feats[1:]`, `preact_feats[1:]` and `pooled_feat` (RepDistiller,
mdistiller). Each maps to a module path, 'path' for the module's output or 'path:in' for its
first input, so a model names its points without any change to its `forward`
(`feature_points(name, model)`; features.py takes them with forward hooks or from the traced
graph).

BatchNorms before the ReLUs. OFD (Heo et al.) draws a margin per channel from the BatchNorm
whose output the ReLU at each pre-activation point takes (mdistiller's `get_bn_before_relu`):
a model names them as {'stage1_pre': 'module.path', ...}, the path of an nn.BatchNorm2d whose
channels are the point's (`bn_before_relu(name, model)`). Where the point adds a shortcut to
the BN's output (a residual block), the BN is the residual branch's last one, as in the
reference. A model that names none trains with every other method.
"""
import torch
import torch.nn as nn

from kd.models.external import build_external, check_arch, is_external

MODELS = {}  # name -> constructor called as constructor(num_classes=...)
POINTS = {}  # name -> {point name: 'module.path' or 'module.path:in'} given at registration
BN_BEFORE_RELU = {}  # name -> {pre-activation point: 'module.path' of a BN} given at registration
MIN_SIZE = {}  # name -> the smallest image side (pixels) it runs at, given at registration


def register_model(name, points=None, bn_before_relu=None, min_size=1):
    """Decorator: make the class or function buildable as build_model(name, num_classes).

    points: the model's feature points, {name: 'module.path' | 'module.path:in'} (see the
    module docstring), for the feature distillers; a model whose class defines
    `feature_points()` needs none, and a model without points still trains with every logit
    loss. bn_before_relu: {pre-activation point: 'module.path' of its BatchNorm2d} (see the
    module docstring), for OFD's margins; a model whose class defines `bn_before_relu()` needs
    none. min_size: the smallest image height and width it runs at (its downsampling's; see
    kd/models/sizes.py), checked by check_image_size before a run trains.
    """
    def add(constructor):
        # refuse silently replacing a model: a checkpoint saved under a name must keep meaning one network
        if name in MODELS:
            raise ValueError(f'model {name!r} is already registered (as {MODELS[name]!r})')
        MODELS[name] = constructor
        if points is not None:
            POINTS[name] = dict(points)
        if bn_before_relu is not None:
            BN_BEFORE_RELU[name] = dict(bn_before_relu)
        MIN_SIZE[name] = min_size
        return constructor
    return add


def feature_points(name, model):
    """{point name: module path spec} of `model`, built as registered model `name`: the points
    given to register_model, else its class's `feature_points()`, else {} (no points)."""
    if name in POINTS:
        return dict(POINTS[name])
    method = getattr(model, 'feature_points', None)
    return dict(method()) if callable(method) else {}


def bn_before_relu(name, model):
    """{pre-activation point: module path of the BatchNorm2d before its ReLU} of `model`, built
    as registered model `name` (None: look at the model only): the names given to
    register_model, else its class's `bn_before_relu()`, else {} (none named)."""
    if name in BN_BEFORE_RELU:
        return dict(BN_BEFORE_RELU[name])
    method = getattr(model, 'bn_before_relu', None)
    return dict(method()) if callable(method) else {}


def stage_points(stages, pre, stem, pooled):
    """The standard points from lists of stage paths and their pre-activation paths."""
    points = {'stem': stem}
    for i, (stage, before) in enumerate(zip(stages, pre), 1):
        points[f'stage{i}'] = stage
        points[f'stage{i}_pre'] = before
    points['pooled'] = pooled
    return points


def model_names():
    return sorted(MODELS)


def build_model(name, num_classes=10):
    """A new, freshly initialized model registered as `name`, or named by an architecture
    string ('torchvision:NAME', 'timm:NAME', 'FILE.py:CLASS', 'module:CLASS': external.py)."""
    if is_external(name):
        return build_external(name, num_classes)
    if name not in MODELS:
        raise KeyError(f'unknown model {name!r}; known models: {", ".join(model_names())}')
    return MODELS[name](num_classes=num_classes)


def check_model(name):
    """Refuse (external.ArchError, one line naming the nearest names) a name that is neither
    registered nor an architecture string naming a model that exists."""
    check_arch(name, model_names())


class Classifier(nn.Linear):
    """The last layer, computed in float32 even under autocast.

    Soft targets at T=4 divide the logits by 4 before the softmax: logits rounded to bf16 (8
    bits of mantissa) would quantise them visibly. The layer is tiny, so fp32 costs nothing.
    Parameter names are nn.Linear's, so checkpoints are unaffected.
    """

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def init_like_reference(model):
    """Kaiming-normal (fan_out) convolutions, BN scale 1 and shift 0: the init the published teachers used."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

