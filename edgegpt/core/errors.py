"""The one exception family for user mistakes.

Kept free of heavy imports: the torch-free runtime raises it too.
"""


class EdgeGPTError(Exception):
    """A user mistake (missing file, bad option, corrupt model, prompt too long).

    The message says what is wrong and what to do; the CLI prints it on one line and exits 2.
    Bugs are not EdgeGPTErrors: they raise normally, with a traceback.
    """


class PromptTooLong(EdgeGPTError):
    """A prompt or conversation longer than the model's context (an HTTP server answers it with 413)."""
