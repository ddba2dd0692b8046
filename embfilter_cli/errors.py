"""Errors the core raises for known bad input.

Every message says what was wrong (with the numbers or the path) and what to do next; the CLI
prints it as one line `Error: …` and exits 1, or, for a `UsageError` (an impossible combination
of options or arguments), after the command's usage line with exit 2. The mapping lives in one
place, `cli.EmbfilterGroup`. Anything else is a bug and keeps its traceback.
"""


class EmbfilterError(Exception):
    """Base class of every known, user-facing failure."""


class ModelNotFoundError(EmbfilterError):
    """The model spec names nothing we can find (folder, file, alias, Hub id)."""


class UnembeddingNotFoundError(EmbfilterError):
    """The checkpoint has no tensor we can identify as the unembedding."""


class BadTensorError(EmbfilterError):
    """The unembedding exists but cannot be used (NaN/Inf, wrong rank, unsupported dtype)."""


class UsageError(EmbfilterError):
    """Options or arguments that cannot go together (or are missing); the CLI exits 2 with the usage line.

    Core modules and commands raise this one class for every usage mistake (never `click.UsageError`),
    so every command reports the same kind of mistake the same way.
    """


class BandError(UsageError):
    """An impossible band (which directions to keep/remove)."""


class ArtifactError(EmbfilterError):
    """A file that is not a valid embfilter artifact, or one that does not fit its use."""


class OutputExistsError(EmbfilterError):
    """Refusing to overwrite an existing output without --force."""


class InputDataError(EmbfilterError):
    """Malformed vectors, texts or evaluation data."""


class MissingDependencyError(EmbfilterError):
    """An optional package is needed; the message names the pip command."""


class SolverAccuracyError(EmbfilterError):
    """A solver missed the requested accuracy certificate."""


class ExportError(EmbfilterError):
    """An export failed its structural or numerical check."""


class HubAccessError(EmbfilterError):
    """The Hugging Face Hub refused or could not be reached (gated, unauthorised, network, server error)."""


class EngineError(EmbfilterError):
    """A compute engine (a Ray cluster) could not be reached or started."""


class ConversionError(EmbfilterError):
    """Converting a GGUF model to a cached Hugging Face folder gave something other than the GGUF model."""


class CacheError(EmbfilterError):
    """The embfilter cache cannot be used as asked (its path is a file, a bad size or age, a removal failed)."""


def printable(text: object) -> str:
    """`text` safe to show on a terminal: control characters (ESC sequences, carriage returns, bidi
    overrides, NUL…) become visible `\\xNN`/`\\uNNNN` escapes.

    The one sanitiser for everything read from a file or a model and printed: model names, tensor
    names, tokens, paths, metadata. Newlines and tabs are kept; callers that need one line join words.
    """
    return str(text).translate(_ESCAPES)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_UNSAFE = [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F]
_UNSAFE += [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]  # bidi embeddings, overrides, isolates
_ESCAPES = {code: _escape(code) for code in _UNSAFE}
