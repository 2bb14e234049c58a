"""torch -> ONNX model package: graph export, quantization, verification, quality gates and the writer.

The training side of edgegpt (imports torch and onnx); the runtime never imports it.
"""

from edgegpt.export.gates import GateFailed, GateLimits
from edgegpt.export.package import ExportReport, export_package
from edgegpt.export.report import render_report

__all__ = ["ExportReport", "GateFailed", "GateLimits", "export_package", "render_report"]
