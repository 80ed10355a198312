"""kdexport command line (`kdexport.cli` once installed): parses options, calls one library function, prints.

Exit codes: 0 ok, 1 a failed check or run, 2 bad usage or input (one line on stderr, no traceback).
"""

# each module registers its subcommands; their order is the order of `kdexport --help`
from . import zoo, compress, deploy, study  # noqa: F401, I001
from .app import app

__all__ = ["app"]
