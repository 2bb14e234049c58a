"""The training stack: corpus and data, the training loop and its resume state, distillation and torchrun scale-out.

Imports nothing on its own, so `edgegpt.train.corpus` (torch-free) can be used without loading torch.
"""
