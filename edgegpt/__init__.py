"""edgegpt: train a compact GPT, export one ONNX package, generate with a torch-free runtime.

This module stays light on purpose: `import edgegpt.runtime` runs it, and a desktop app must not pay
for torch. Training code is imported from its own modules (`edgegpt.train.loop`, `edgegpt.model`).
"""

from edgegpt.core.errors import EdgeGPTError

__version__ = "0.1.0"
__all__ = ["EdgeGPTError", "__version__"]
