"""The torch-free core every part of edgegpt imports: errors, the formats' file names, model config, io, workspace.

Standard library and numpy only: the runtime imports it, and a desktop app must not pay for torch or onnx.
"""
