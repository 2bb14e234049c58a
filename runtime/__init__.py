"""The torch-free runtime: load a model package and generate text with onnxruntime.

    from edgegpt.runtime import Generator
    g = Generator.load("edgegpt-out/model")
    print(g.generate("Once upon a time", max_new_tokens=50))

Imports numpy, onnxruntime, tokenizers and edgegpt.core.errors only, so a desktop app never pays for torch.
"""

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.generator import Generator, Stream
from edgegpt.runtime.options import GenerateOptions
from edgegpt.runtime.package import ModelPackage

__all__ = ["EdgeGPTError", "GenerateOptions", "Generator", "ModelPackage", "Stream"]
