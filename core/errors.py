"""Errors the engine and the server share."""


class ParamError(ValueError):
    """A request parameter that is wrong or not supported, with the parameter's name (the server's 400 `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled whole across the pipe from the engine process
        return ParamError, (self.field, str(self))
