"""User-facing errors: one line that names the problem and the fix."""


class ReparamError(Exception):
    """Base class of every error reparam raises on purpose."""


class EquivalenceError(ReparamError):
    """The fused model disagrees with the original (a compiler bug: please report the model)."""


class InputError(ReparamError):
    """Something the user supplied is wrong (a file, an architecture, a path); the CLI exits with code 2."""
