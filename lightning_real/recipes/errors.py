"""The one error type of recipes: a message a user can act on, printed without a traceback."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file or key and what to change."""
