"""`python -m kdexport.cli`: the same app as the `kdexport` console script."""

from .app import app

app()
