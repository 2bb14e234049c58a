"""edgegpt: the checkpoint exported by edgegpt's own exporter, run through its Generator."""

from __future__ import annotations

from pathlib import Path

from .models import Models, files_size
from .worker import Runner


def prepare(models: Models, precision: str) -> tuple[Path, int]:
    """fp32/int8/int4 packages by `export_package`, gates off: `formats.py quantization` measures quality."""
    def build(out: Path) -> None:
        from edgegpt.export.package import export_package

        quantize = precision != "fp32"
        bits = int(precision[3:]) if quantize else 8
        rounding = models.int4_rounding if bits == 4 else None
        calibrated = quantize and rounding != "rtn"  # round-to-nearest reads no calibration text
        export_package(models.checkpoint, out / "model", quantize=quantize, bits=bits, gate=False,
                       rounding=rounding, calibration_data=models.calibration if calibrated else None)
    directory = models.once(models.root / f"edgegpt-{precision}", build) / "model"
    return directory, files_size(directory.glob("model.onnx*"))


class EdgegptRunner(Runner):
    def __init__(self, path: str, threads: int, max_length: int):
        import numpy as np

        from edgegpt.runtime import Generator

        self.np = np
        # The static cache is sized to the longest request, as onnxruntime-genai's is (its max_length).
        self.generator = Generator.load(path, provider="cpu", threads=threads, max_length=max_length)

    def first(self, ids):
        logits, cache = self.generator.prefill(list(ids))
        return int(self.np.argmax(logits)), cache

    def step(self, token, cache):
        logits, cache = self.generator.decode_step(token, cache)
        return int(self.np.argmax(logits)), cache
