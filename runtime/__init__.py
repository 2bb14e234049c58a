from edgegpt.errors import EdgeGPTError
