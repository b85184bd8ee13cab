"""Every error moee raises on purpose: one base class, so callers can catch them all."""

from __future__ import annotations


class MoeeError(Exception):
    """Base of every error moee raises on purpose (bad input, bad checkpoint, no clusters)."""


class ConfigError(MoeeError, ValueError):
    """A setting is out of range or of the wrong type; the message names the field."""


class CheckpointError(MoeeError, ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match the model it describes."""


class NoMLPBlocksError(MoeeError, ValueError):
    """The model has no MLP block that any registered adapter recognises."""


class EmptyDataError(MoeeError, ValueError):
    """The calibration or training data produced no tokens."""


class TooFewTokensError(MoeeError, ValueError):
    """Fewer tokens than the minimum cluster size: nothing could ever form a cluster."""


class NoClustersError(MoeeError, RuntimeError):
    """Clustering found no cluster in any layer, so there is nothing to turn into experts."""


class ResourceError(MoeeError, MemoryError):
    """The requested work would not fit in this machine's disk or memory."""


class DataNotFoundError(MoeeError, FileNotFoundError):
    """A dataset moee was asked to read is not where it was looked for."""


class AdapterMismatchError(MoeeError, ValueError):
    """An adapter matched a block whose forward is not the MLP the adapter describes."""


class BadBatchError(MoeeError, TypeError):
    """A batch is not a tensor, an (inputs, labels) pair or a dict of keyword tensors."""


class NonFiniteError(MoeeError, ValueError):
    """NaN or Inf in the data, in a layer's activations (or beyond the store's range), in a
    training loss or gradient, or in weights about to be saved."""


class WriteError(ResourceError, OSError):
    """A file could not be written (disk full, file-size limit, no permission), whatever
    library wrote it; the message names the file, and no half-written file is left under it.
    An OSError too, so code that caught the library's OSError still catches it."""


class WorkerDiedError(MoeeError, RuntimeError):
    """The child process running a long computation ended without a result (killed, or out
    of memory)."""


class OutputError(ConfigError):
    """An output path that would destroy something the command did not make: an input, an
    existing folder or file of another kind (unless overwriting is asked for), or ''."""
