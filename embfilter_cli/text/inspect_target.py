"""What `embfilter inspect` looks at: a model's W_U, its vocabulary and an optional filter, checked together.

`InspectTarget` resolves the model the way every inspect subcommand does (`--model`, else the
filter's own model, else the built-in default: `model.head.locate_for_filter`), reads W_U as the
filter was fitted on it and refuses a filter from another model (`model.head.read_head_for_filter`),
then loads the tokenizer's vocabulary so tokens can be shown. Log lines and warnings go through
callbacks; nothing here prints.

Not handled: the directions, lens and spectrum themselves (`text/directions.py`, `text/lens.py`,
`filters/solve.py`), formatting (the `commands/inspect_*` modules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.model.unembedding import Unembedding
    from embfilter_cli.text.tokens import Vocabulary


def _silent(message: str) -> None:
    """The default log: drop the line."""


class InspectTarget:
    """W_U, its vocabulary and the (optional) filter, resolved and checked against each other.

    Attributes:
        artifact: the loaded filter, or None.
        spec: the spec to load the model with (None: the built-in default).
        location / unemb / vocab: the model, its W_U and its vocabulary; None when
            `need_matrix` is False (everything needed is in the filter; the model need not exist).
    """

    def __init__(
        self,
        model: str | None,
        revision: str | None,
        filter_path: str | None,
        need_matrix: bool = True,
        log: Callable[[str], None] = _silent,
        warn: Callable[[str], None] = _silent,
    ) -> None:
        from embfilter_cli.filters.artifact import load_artifact

        self.artifact: FilterArtifact | None = load_artifact(filter_path) if filter_path else None
        self.spec: str | None = model
        self.location: ModelLocation | None = None
        self.unemb: Unembedding | None = None
        self.vocab: Vocabulary | None = None
        if not need_matrix:
            return
        from embfilter_cli.model.head import locate_for_filter, read_head, read_head_for_filter
        from embfilter_cli.text.tokens import Vocabulary, load_vocabulary

        self.spec, self.location = locate_for_filter(model, revision, self.artifact)
        log(f"Model: {self.location.source}")
        self.unemb = (
            read_head_for_filter(self.location, self.artifact)
            if self.artifact is not None
            else read_head(self.location)
        )
        vocab = load_vocabulary(self.location)
        if vocab is None:
            warn(f"no tokenizer files found for {self.location.source}; tokens are shown as <id N>")
            vocab = Vocabulary([], "plain", set(), "")
        self.vocab = vocab

    @property
    def valid_rows(self) -> int:
        """Rows that are real tokens: padding rows past the tokenizer's vocabulary are masked."""
        assert self.unemb is not None
        rows = self.unemb.vocab_size
        return min(rows, len(self.vocab)) if self.vocab is not None and len(self.vocab) else rows
