"""`ldlm export` and `ldlm info`: export a checkpoint's graphs; describe a model folder without opening a graph."""

from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs (backend onnx) or AOTInductor packages "
                                      "(backend aoti) and a manifest")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("outdir", help="new directory for the graphs, tokenizers and manifest.json")
    p.add_argument("--format", choices=("onnx", "aoti"), default="onnx",
                   help="onnx: ONNX graphs for ONNX Runtime (default), data; aoti: AOTInductor packages compiled "
                        "for this CPU (float32; minutes to compile, nothing compiles at load), which are native code: "
                        "signed with your key, so your ldlm loads them; anyone else's needs --trust-native-code")
    p.add_argument("--no-fp16", action="store_true", help="onnx: skip the float16 graphs")
    p.add_argument("--no-int8", action="store_true", help="onnx: skip the int8 reverse transformer and decoder step")
    p.add_argument("--opset", type=int, default=18, help="onnx: ONNX opset (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUTDIR (never anything else)")
    p = sub.add_parser("info", help="describe a checkpoint or an ONNX export")
    p.add_argument("checkpoint", help="checkpoint or export directory")


def cmd_export(args) -> None:
    from ldlm.export.onnx_export import export_checkpoint

    if args.format == "aoti":
        from ldlm.export.aoti_export import export_aoti

        export_aoti(args.checkpoint, args.outdir, overwrite=args.overwrite)
        return
    variants = ("float32",) if args.no_fp16 else ("float32", "float16")
    export_checkpoint(args.checkpoint, args.outdir, variants=variants, int8=not args.no_int8, opset=args.opset,
                      overwrite=args.overwrite)


def cmd_info(args) -> None:
    from ldlm.export.manifest import graph_format, is_export, read_manifest, signed_by_this_user
    from ldlm.model.checkpoint import load_checkpoint

    if is_export(args.checkpoint):  # an export (ONNX or AOTI): its manifest, checked, never a graph opened
        manifest = read_manifest(args.checkpoint)
        native = None
        if graph_format(manifest) == "aoti":
            native = ("AOTInductor packages: signed by your key, so they load" if signed_by_this_user(manifest) else
                      "AOTInductor packages not signed by your key: they load only with --trust-native-code")
        graphs = {variant: {name: {"file": g["file"], "inputs": [i["name"] for i in g["inputs"]],
                                   "outputs": [o["name"] for o in g["outputs"]]} for name, g in specs.items()}
                  for variant, specs in manifest["graphs"].items()}
        print(json.dumps({"export": str(args.checkpoint), "format": manifest["format"], "opset": manifest.get("opset"),
                          "exporter": manifest["exporter"], "target": manifest.get("target"),
                          "versions": manifest["versions"], "model": manifest["model"], "graphs": graphs,
                          "files": len(manifest["files"]), "hashes": "verified", "native_code": native}, indent=2))
        return

    c = load_checkpoint(args.checkpoint)
    meta = json.loads((Path(args.checkpoint) / "config.json").read_text())
    n_params = {name: sum(p.numel() for p in module.parameters())
                for name, module in (("encoder", c.encoder), ("reverse", c.reverse), ("decoder", c.decoder))}
    state_file = Path(args.checkpoint) / "training" / "state.json"
    info = {
        "checkpoint": str(args.checkpoint),
        "ldlm_version": meta["ldlm_version"],
        "encoder": (f"bundled ({'from ' + c.config.encoder if c.config.encoder else 'built in code'})"
                    if c.encoder_bundled else c.config.encoder),
        "latent_dim": c.config.latent_dim,
        "latent_shape": list(c.config.latent_shape),
        "parameters": n_params,
        "decoder_vocab": len(c.decoder.tokenizer),
        "model": c.config.to_dict(),
        "training": json.loads(state_file.read_text()) if state_file.is_file() else None,
    }
    print(json.dumps(info, indent=2))


# the command each parser of this group runs
COMMANDS = {"export": cmd_export, "info": cmd_info}
