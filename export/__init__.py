"""Export of encoder, reverse transformer and decoder to ONNX graphs (issue 5)."""
