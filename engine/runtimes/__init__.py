"""Which implementation runs a pipeline (backends), and the runtimes of exported graphs: ONNX Runtime and AOTInductor
packages."""
