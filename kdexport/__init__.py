"""kdexport: distil, prune, export and profile image classifiers for deployment.

Importing this package is cheap: it initialises no CUDA context and imports neither triton, tensorrt nor onnxruntime.
"""

__version__ = "0.1.0"
