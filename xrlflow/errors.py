"""Error types. The CLI maps BadInputError to exit code 2 and a one-line message, anything else to 1."""


class XrlflowError(Exception):
    """Base class of the errors xrlflow raises on purpose."""


class BadInputError(XrlflowError):
    """The user's input (model file, flag, policy file) cannot be used; the message says why."""


class GraphError(XrlflowError):
    """An internal inconsistency in a graph (a cycle, a value produced twice, a broken rewrite)."""
