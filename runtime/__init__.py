"""The torch-free runtime: load a model package and generate text with onnxruntime.

    from edgegpt.runtime import Generator
    g = Generator.load("edgegpt-out/model")
    print(g.generate("Once upon a time", max_new_tokens=50))
    print(g.chat([{"role": "user", "content": "What is the capital of France?"}]))  # with a chat template

Imports numpy, onnxruntime, tokenizers, jinja2 (for chat templates, at the first chat) and edgegpt.core
only, so a desktop app never pays for torch.
"""

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.generator import Generator, Stream
from edgegpt.runtime.options import GenerateOptions
from edgegpt.runtime.package import ModelPackage

__all__ = ["EdgeGPTError", "GenerateOptions", "Generator", "ModelPackage", "Stream"]
