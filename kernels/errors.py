"""The kernels' own error (a ValueError subclass): the kernels import nothing from the pipeline above them."""


class KernelConfigError(ValueError):
    """A sparsify option outside its valid range. The CLI prints it as one line (exit 2)."""
