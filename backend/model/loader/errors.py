"""The one exception the loading layer raises for anything a user can get wrong."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and what is wrong."""
