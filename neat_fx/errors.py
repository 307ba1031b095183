"""Exceptions raised by neat_fx. Every message names the thing, what was expected, and the fix."""


class NeatError(Exception):
    """Base class of every error neat_fx raises on purpose."""


class ConfigError(NeatError, ValueError):
    """An option of `NeatConfig` (or of a call) is out of range."""


class PatternError(NeatError, ValueError):
    """A pattern matched nothing, or matched a parameter that is not a linear weight."""


class CaptureError(NeatError, RuntimeError):
    """The model could not be captured as a graph with the given example inputs."""


class InputMismatchError(NeatError, TypeError):
    """A captured module was called with inputs whose structure differs from the example inputs."""


class AdapterMismatchError(NeatError, ValueError):
    """Saved adapters do not fit the model or module they are loaded onto."""


class MergeError(NeatError, RuntimeError):
    """Merging adapters into a model would not preserve the function `nm` computes."""


class GenerationError(NeatError, ValueError):
    """`neat_fx.generate` was asked for something the model or the inputs cannot give."""


class DeviceError(NeatError, RuntimeError):
    """A device the call asks for is not available to the runtime installed here."""
