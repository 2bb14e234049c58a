"""The torch-free core every part of edgegpt imports: errors, file names of the formats, model config, atomic io and the workspace.

Standard library and numpy only: the runtime imports it, and a desktop app must not pay for torch or onnx.
"""
