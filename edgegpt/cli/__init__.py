"""The command surface: the `edgegpt` commands, one module each (train.py, export.py, eval.py, generate.py,
chat.py, serve.py, convert.py, bench.py, info.py) that app.py registers, and what they draw and run (the
options they share, one-line errors, the training progress, the chat loop, the benchmark's child process,
the inspector, the generated command reference).

Imports nothing on its own, and each command imports the heavy modules (torch, onnx, the runtime) it needs
when it runs, so `edgegpt --help` is light and `edgegpt generate` starts as fast as the runtime does.
"""
