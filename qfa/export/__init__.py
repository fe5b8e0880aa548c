"""Export of searched subnets: a standalone static quantized model (:mod:`~qfa.export.standalone`),
ONNX with QuantizeLinear/DequantizeLinear and an .npz of integer weights
(:mod:`~qfa.export.onnx_export`). The command is ``qfa export``."""

from .onnx_export import activation_qparams, deployment_arrays, export_onnx, run_onnx, save_deployment_npz, to_onnx
from .standalone import export_subnet, load_standalone

__all__ = [
    "activation_qparams",
    "deployment_arrays",
    "export_onnx",
    "export_subnet",
    "load_standalone",
    "run_onnx",
    "save_deployment_npz",
    "to_onnx",
]
