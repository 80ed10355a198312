"""The zoo's own errors (ValueError subclasses): the zoo imports nothing from the pipeline above it."""


class ModelError(ValueError):
    """A model, stem, pair or option the zoo does not know. The CLI prints it as one line (exit 2)."""


class PretrainedWeightsError(ModelError):
    """A `--pretrained` file that is missing, not a state_dict, or made for another architecture."""
