"""The one exception family convc raises for problems a user can fix.

Every error that reaches the command line is a ConvcError (or a subclass):
the CLI prints its message and exits with status 1 instead of a traceback.
Subclasses live next to the code that raises them (spec diagnostics,
data loading, checkpoints); this module only holds the base so that every
stage can share it without importing another stage.
"""


class ConvcError(Exception):
    """A problem with user input: a spec, a data file, a checkpoint, an option."""


class DataError(ConvcError):
    """A data file that is missing or has the wrong shape, dtype or range."""


class CheckpointError(ConvcError):
    """A checkpoint that cannot be read, or fails its checksum."""


class BackendError(ConvcError):
    """A backend that was asked for but is not available here."""


class NonFiniteError(ConvcError):
    """A NaN or Inf appeared during training.

    With --debug-nans the generated code raises it at the first non-finite
    value, with the graph node, the .cell file and line, the time step and
    the pass (forward or backward) as attributes.
    """

    def __init__(self, message: str, node: str | None = None, where: str | None = None,
                 step: int | None = None, direction: str | None = None):
        super().__init__(message)
        self.node, self.where, self.step, self.direction = node, where, step, direction


class CallError(DataError, ValueError):
    """A generated function (forward, loss, loss_and_grad) called with arguments that do not
    fit its model: a missing or unknown input, target, parameter or state, a wrong shape,
    a forecast without steps=. Raised by convc.runtime.calls.check_call, naming the argument,
    what the model expects and what it was given. A ValueError too, for callers that expect
    one from bad arguments."""


class CallTypeError(CallError, TypeError):
    """A CallError for an argument of the wrong kind: not a dict, not an array."""
