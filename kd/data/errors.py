"""The data layer's errors, in a module of their own so that every reader can raise them."""


class DataError(Exception):
    """A dataset is missing, truncated or not what it claims; the message says which file and
    what to do."""


class LayoutError(DataError):
    """A dataset folder's layout cannot be used (a missing folder or file, an empty class
    folder, images of mixed sizes without --image-size): bad input, refused before anything
    is written (the run's UsageError, exit 2)."""
