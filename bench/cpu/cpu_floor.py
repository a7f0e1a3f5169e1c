"""What bounds `generate(1)` on a CPU, in one run: the int8 reverse graph's weights against the memory's read
bandwidth, and the decode's steps.

    python bench/cpu/cpu_floor.py EXPORT [--threads 2] [--runs 15] [--json OUT]

EXPORT: an `ldlm export` folder (with its int8 graphs). Each sampling step reads every weight of the reverse
transformer once (at batch 1 its matmuls have a few rows: K latent tokens), so the loop cannot beat
steps x weight bytes / read bandwidth. The script measures:
- the read bandwidth: a sum over 256 MB (past any cache), and over the int8 weights' size;
- the reverse int8 graph per call, and its weight MatMuls alone (the same shapes chained, quantized the same
  way) at the step's rows: how fast ONNX Runtime's int8 kernel streams the weights;
- the sampling loop, the decode (its steps a text counted), `generate(1)` (int8 graphs, C beam bookkeeping),
  median and p90, beside the floors."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import ldlm
from ldlm.jobs.benchmark import timed
from ldlm.runtimes.onnx_session import OnnxOptions

CPU = torch.device("cpu")


def read_bandwidth(megabytes: int, runs: int) -> float:
    """GB/s of torch's sum over a float32 tensor of `megabytes` (the threads torch has)."""
    x = torch.ones(megabytes * 2**20 // 4)
    return megabytes * 2**20 / timed(x.sum, CPU, warmup=2, iters=runs)["median_s"] / 1e9


def weight_matmuls(graph_path: Path) -> list[tuple[int, int]]:
    """The (in, out) shapes of the int8 graph's quantized weights, in graph order."""
    import onnx

    graph = onnx.load(str(graph_path)).graph
    return [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]


def matmul_chain(shapes: list[tuple[int, int]], rows: int, threads: int, runs: int) -> float:
    """Seconds a call of a graph holding only these MatMuls (random weights, ONNX Runtime's dynamic int8
    quantization per output channel, as ldlm export's) takes at `rows` rows; each MatMul reads the graph input,
    so every weight is read once a call, as in the reverse graph."""
    import onnx
    import onnx.helper as h
    import onnx.numpy_helper as nh
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    width = max(k for k, _ in shapes)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits += [nh.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"),
                  nh.from_array(np.array([0, 0], np.int64), f"start{i}"), nh.from_array(np.array([rows, k]), f"end{i}")]
        nodes += [h.make_node("Slice", ["x", f"start{i}", f"end{i}"], [f"x{i}"]),
                  h.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"])]
        outputs.append(h.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [rows, n]))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [rows, width])],
                         outputs, inits)
    model = onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "chain.onnx", Path(tmp) / "chain.int8.onnx"
        onnx.save(model, str(fp32))
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as ldlm's reverse graph
        session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal((rows, width)).astype(np.float32)}
    return timed(lambda: session.run(None, feed), CPU, warmup=3, iters=runs * 4)["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    export = Path(args.export)
    pipe = ldlm.load(export, onnx_options=OnnxOptions(intra_op_threads=args.threads, int8_reverse=True,
                                                      int8_decoder=True))
    config, steps = pipe.config, pipe.config.sampling_steps
    rows = 1 if len(config.latent_shape) == 1 else config.latent_shape[0]  # the reverse matmuls' rows at batch 1
    graph_path = export / "reverse.int8.onnx"
    shapes = weight_matmuls(graph_path)
    weight_mb = sum(k * n for k, n in shapes) / 1e6
    bandwidth = {"256 MB": read_bandwidth(256, args.runs), "weights' size": read_bandwidth(round(weight_mb), args.runs)}
    floor_step_ms = weight_mb / bandwidth["256 MB"]  # MB / (GB/s) = ms

    x, t = torch.randn(1, *config.latent_shape), torch.full((1,), 500.0)
    graph = timed(lambda: pipe.reverse(x, t), CPU, warmup=3, iters=args.runs * 4)["median_s"] * 1e3
    chain = matmul_chain(shapes, rows, args.threads, args.runs) * 1e3

    decoder, counted = pipe.components.decoder, []
    step = decoder.step
    decoder.step = lambda *a: counted.append(1) or step(*a)  # this pipeline's decoder only: the decode's steps
    latents = [pipe.sample_latents(1, seed=s, progress=False) for s in range(args.runs)]
    decode_steps = []
    for z in latents:
        counted.clear()
        pipe.decode(z, progress=False)
        decode_steps.append(len(counted) + 1)  # the prefill's token too
    cycle = iter(latents * 4)
    stages = {"sampling loop": timed(lambda: pipe.sample_latents(1, progress=False), CPU, 2, args.runs),
              "decode": timed(lambda: pipe.decode(next(cycle), progress=False), CPU, 2, args.runs),
              "generate(1)": timed(lambda: pipe.generate(1, progress=False), CPU, 2, args.runs)}

    mean_tokens = sum(decode_steps) / len(decode_steps)
    print(f"{export}: {steps} {config.sampler} steps, reverse int8 weights {weight_mb:.1f} MB ({len(shapes)} "
          f"MatMuls, {rows} rows at batch 1); decode {mean_tokens:.1f} tokens a text ({min(decode_steps)}-"
          f"{max(decode_steps)}), {config.n_layer}-layer {config.n_embd}-wide decoder, 4 beams; {args.threads} threads\n")
    print("| figure | measured | floor or comparison |\n| --- | --- | --- |")
    for name, gbs in bandwidth.items():
        print(f"| read bandwidth, sum over {name} | {gbs:.1f} GB/s | |")
    print(f"| reverse int8 graph, one call | {graph:.2f} ms | weights at the 256 MB read bandwidth: "
          f"{floor_step_ms:.2f} ms |")
    print(f"| its {len(shapes)} MatMuls alone | {chain:.2f} ms ({weight_mb / chain:.1f} GB/s) | |")
    for name, r in stages.items():
        floor = {"sampling loop": f"{steps} x {floor_step_ms:.2f} = {steps * floor_step_ms:.0f} ms (weights), "
                                  f"{steps} x {graph:.2f} = {steps * graph:.0f} ms (the graph)",
                 "decode": f"{r['median_s'] * 1e3 / mean_tokens:.2f} ms a token",
                 "generate(1)": "target 100 ms"}[name]
        print(f"| {name} | {r['median_s'] * 1e3:.0f} ms (p90 {r['p90_s'] * 1e3:.0f}) | {floor} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "weight_mb": weight_mb, "bandwidth_gbs": bandwidth, "graph_ms": graph,
                       "matmuls_ms": chain, "decode_steps": decode_steps,
                       "stages": {k: {"median_ms": v["median_s"] * 1e3, "p90_ms": v["p90_s"] * 1e3}
                                  for k, v in stages.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
