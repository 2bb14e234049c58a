"""The command surface: the `edgegpt` commands (app.py), their progress display, chat loop, benchmark and inspector.

Imports nothing on its own, and each command imports the heavy modules (torch, onnx) it needs when it
runs, so `python -m edgegpt.cli.bench` and `edgegpt generate` start as fast as the runtime does.
"""
