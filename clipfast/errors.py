"""What clipfast raises when it is given something it cannot use: one base class, so that the
`clipfast` command reports every such problem as a usage error (its message, exit code 2) while a
bug still shows its traceback. Each layer defines its own subclasses next to the code that raises
them (models.ModelLoadError, data.UnreadableImageError, ops.BackendUnavailable, ...); the ones
shared by several layers live here."""

from __future__ import annotations


class ClipfastError(Exception):
    """A problem with clipfast's input, settings or run directory; the message names it."""


class RunMismatchError(ClipfastError, ValueError):
    """A run directory, a scan shard or a training checkpoint holds the work of a run with other
    settings or inputs: resuming from it would mix two runs. Use a new output directory."""


class NonFiniteError(ClipfastError, FloatingPointError):
    """A model produced NaN or inf (scores or a training loss): its weights or its input are broken,
    or training diverged. Nothing computed from it is written."""
