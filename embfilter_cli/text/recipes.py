"""Recipes (prompt templates with a `{text}` slot) and the pooling names, checked once.

A recipe wraps each text before it is embedded: `RECIPES` holds the named ones from the
EmbedFilter paper's setups (`none`, PromptEOL, summarize, echo), and any custom string with a
`{text}` slot is a recipe too. The text-embedding code (`text.embedding`), the evaluation, the
background centring and the exports all resolve recipes and poolings here.
"""

from __future__ import annotations

from dataclasses import dataclass

from embfilter_cli.errors import InputDataError

TEXT_SLOT = "{text}"
RECIPES: dict[str, str] = {
    "none": "{text}",
    "prompteol": 'This sentence: "{text}" means in one word:"',
    "summarize": 'Summarize the sentence: "{text}" in one word:"',
    "echo": "Rewrite the following paragraph: {text}. The rewritten paragraph: {text}",
}
POOLINGS = ("mean", "last")


@dataclass(frozen=True)
class Recipe:
    """A prompt template with one or more `{text}` slots.

    `pool_last_copy` (the echo recipe) restricts mean pooling to the tokens of the last copy of
    the text, so every pooled token has already seen the whole text once.
    """

    name: str
    template: str
    pool_last_copy: bool = False

    @property
    def copies(self) -> int:
        """How many times the template contains the text (2 for echo)."""
        return self.template.count(TEXT_SLOT)

    def render(self, text: str) -> tuple[str, tuple[int, int]]:
        """The prompt for `text` and the character span of the last copy of `text` in it."""
        # str.replace/split rather than str.format: braces elsewhere in a custom template are literal.
        parts = self.template.split(TEXT_SLOT)
        prompt = text.join(parts)
        end_of_last = len(prompt) - len(parts[-1])
        return prompt, (end_of_last - len(text), end_of_last)


def resolve_recipe(recipe: str) -> Recipe:
    """A recipe name from `RECIPES`, or a custom template containing `{text}`."""
    if recipe in RECIPES:
        return Recipe(recipe, RECIPES[recipe], pool_last_copy=recipe == "echo")
    if TEXT_SLOT not in recipe:
        raise InputDataError(
            f"--recipe {recipe!r} is neither a known recipe ({', '.join(RECIPES)}) nor a template containing "
            "{text}; e.g. --recipe 'Query: {text}'"
        )
    return Recipe("custom", recipe)


def check_pooling(pooling: str) -> str:
    """Return `pooling` if it is a known pooling; InputDataError otherwise."""
    if pooling not in POOLINGS:
        raise InputDataError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    return pooling
