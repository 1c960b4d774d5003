"""Models and data under a recipe: what it sets up in a new model (frozen BatchNorm scales, the
whitening layer) and the training loader's augmentation."""


def loader_options(recipe):
    """The training loader's augmentation (make_loaders' keywords, LoaderOptions' fields)."""
    return {'padding': recipe.crop_padding, 'padding_mode': recipe.padding_mode,
            'flip': recipe.flip}


def prepare_model(module, recipe, train_loader, like=None):
    """Set up what the recipe sets up in a new model: its frozen BatchNorm scales
    (freeze_norm_scales) and its patch-whitening layer (`init_whitening`, for models that have
    them), the latter from the first whiten_images images of train_loader's (unaugmented)
    training images. like: a prepared module of the same architecture whose weights and frozen
    parameters are copied instead (students start from identical weights). Returns the module."""
    if like is not None:
        module.load_state_dict(like.state_dict())
        for p, q in zip(module.parameters(), like.parameters()):
            p.requires_grad_(q.requires_grad)
        return module
    if recipe.freeze_norm_scales and hasattr(module, 'freeze_norm_scales'):
        module.freeze_norm_scales()
    if recipe.whiten_images and hasattr(module, 'init_whitening') and train_loader is not None:
        images = train_loader.images[:recipe.whiten_images]
        module.init_whitening(train_loader.normalize(images).to(
            next(module.parameters()).device))
    return module
