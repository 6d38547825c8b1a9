"""The one exception the model pipeline raises for a user-facing problem.

Its message says what was wrong, where (file, layer, option) and what to do. The CLI prints it and
exits non-zero; no output folder is left behind (``quant.artifact.atomic_dir``)."""


class QuantError(Exception):
    """A problem with the user's input: checkpoint, text, recipe or architecture."""
