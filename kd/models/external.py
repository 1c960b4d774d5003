"""The user's own models, named by an architecture string instead of registered in code.

    torchvision:NAME          a classification model of torchvision.models (weights=None)
    timm:NAME                 a timm model (pretrained=False), when timm is installed
    path/to/file.py:CLASS     a class (or function) of a Python file
    package.module:CLASS      a class (or function) of an importable module

Each is built with `num_classes=` (the dataset's class count) and freshly initialised: no weights
are ever fetched; a user's trained weights come with --teacher-checkpoint. A bad string is refused
with one line (ArchError) naming the nearest names (difflib). A user's file is identified by its
content (`source_sha256`): the run records it, so a file changed since is noticed.
"""
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys

import torch.nn as nn

LIBRARIES = ('torchvision', 'timm')
AUX_LOGITS = ('googlenet', 'inception_v3')  # torchvision models with auxiliary classifiers
FORMS = 'a registered name, torchvision:NAME, timm:NAME, FILE.py:CLASS or package.module:CLASS'


class ArchError(ValueError):
    """An architecture string that names no model: one line for the user (exit 2)."""


def is_external(arch):
    """Whether `arch` is an architecture string rather than a registered name."""
    return isinstance(arch, str) and ':' in arch


def split_arch(arch):
    """'SOURCE:NAME' -> (SOURCE, NAME); the last ':' splits, so a Windows path keeps its drive."""
    source, _, name = arch.rpartition(':')
    if not source or not name:
        raise ArchError(f'architecture {arch!r}: expected {FORMS}')
    return source, name


def nearest(name, candidates, n=5):
    """', '.join of the closest names in candidates to name (difflib), or of the first few."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return ', '.join(close or sorted(candidates)[:n])


def torchvision_names():
    """The classification models of torchvision.models (not detection, segmentation, video)."""
    import torchvision.models  # lazy: torchvision is slow to import and only these strings need it
    return torchvision.models.list_models(module=torchvision.models)


def check_torchvision(name):
    if name not in torchvision_names():
        raise ArchError(f'torchvision has no classification model {name!r} (nearest: '
                        f'{nearest(name, torchvision_names())})')


def build_torchvision(name, num_classes):
    import torchvision.models  # lazy: see torchvision_names
    check_torchvision(name)
    # their auxiliary classifiers make training forwards return a tuple: logits only here
    extra = {'aux_logits': False} if name in AUX_LOGITS else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def timm_module():
    try:
        import timm  # lazy: an optional dependency (requirements-optional.txt)
    except ImportError:
        raise ArchError('timm:NAME needs timm, which is not installed (pip install -r '
                        'requirements-optional.txt)') from None
    return timm


def check_timm(name):
    timm = timm_module()
    if not timm.is_model(name):
        raise ArchError(f'timm has no model {name!r} (nearest: '
                        f'{nearest(name, timm.list_models())})')
    return timm


def build_timm(name, num_classes):
    return check_timm(name).create_model(name, pretrained=False, num_classes=num_classes)


def source_file(source):
    """The file a user's source names: the path itself for 'FILE.py', the module's file for a
    dotted module name (None where it has none); ArchError when neither is there."""
    if source.endswith('.py'):
        if not os.path.isfile(source):
            raise ArchError(f'architecture {source}: no such file')
        return os.path.abspath(source)
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ArchError(f'architecture {source}: no such module (a file must end in .py)')
    return spec.origin if spec.origin and os.path.isfile(spec.origin) else None


def source_sha256(arch):
    """sha256 of the source file a user's architecture string names (None for a registered
    name, torchvision's and timm's, or a module without a file)."""
    if not is_external(arch):
        return None
    source, _ = split_arch(arch)
    if source in LIBRARIES:
        return None
    path = source_file(source)
    if path is None:
        return None
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def first_line(error):
    """'Type: the first line of its message' of an exception raised by a user's code."""
    text = str(error).strip()
    return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


_LOADED = {}  # (path, sha256) -> module: a file is executed once per content


def load_source(source):
    """The module of a user's source: a file executed (its folder importable meanwhile, for its
    own imports), or an importable module. ArchError, one line, when it fails."""
    if not source.endswith('.py'):
        source_file(source)
        try:
            return importlib.import_module(source)
        except Exception as e:
            raise ArchError(f'{source} could not be imported ({first_line(e)})') from None
    path = source_file(source)
    key = (path, source_sha256(f'{source}:_'))
    if key not in _LOADED:
        name = 'kd_user_' + hashlib.sha256(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(path))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ArchError(f'{source} could not be run ({first_line(e)})') from None
        finally:
            sys.path.remove(os.path.dirname(path))
        _LOADED[key] = module
    return _LOADED[key]


def user_constructor(source, name):
    """The class or function `name` of a user's source; ArchError naming the nearest ones."""
    module = load_source(source)
    constructor = getattr(module, name, None)
    if not callable(constructor):
        found = [k for k, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, nn.Module) and not k.startswith('_')]
        raise ArchError(f'{source} has no class {name!r} (nearest: '
                        f'{nearest(name, found) or "no nn.Module there"})')
    return constructor


def build_external(arch, num_classes):
    """A new model from architecture string `arch` with `num_classes` outputs; ArchError when
    the string names none, or what it builds is not an nn.Module."""
    source, name = split_arch(arch)
    if source == 'torchvision':
        model = build_torchvision(name, num_classes)
    elif source == 'timm':
        model = build_timm(name, num_classes)
    else:
        try:
            model = user_constructor(source, name)(num_classes=num_classes)
        except ArchError:
            raise
        except Exception as e:  # the user's code: its first line, not a traceback
            raise ArchError(f'{arch}(num_classes={num_classes}) failed ({first_line(e)})') from None
    if not isinstance(model, nn.Module):
        raise ArchError(f'{arch} built a {type(model).__name__}, not an nn.Module')
    return model


def check_arch(arch, registered):
    """Refuse (ArchError, one line) an architecture that is neither a name of `registered`
    nor a string naming a model that exists (the library's name, the file and its class)."""
    if not is_external(arch):
        if arch not in registered:
            raise ArchError(f'unknown model {arch!r} (nearest: {nearest(arch, registered)}); '
                            f'give {FORMS}')
        return
    source, name = split_arch(arch)
    if source == 'torchvision':
        check_torchvision(name)
    elif source == 'timm':
        check_timm(name)
    else:
        user_constructor(source, name)
