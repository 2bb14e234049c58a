"""torch -> ONNX model package: graph export, quantization, verification and the package writer.

The training side of edgegpt (imports torch and onnx); the runtime never imports it.
"""

from edgegpt.export.package import ExportReport, export_package, render_report

__all__ = ["ExportReport", "export_package", "render_report"]
