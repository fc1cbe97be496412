"""``dmlrun-export``: a trained run's model as one file, TorchScript or ONNX, that takes a
(B, C, H, W) uint8 image batch and returns (B, D) float32 embeddings, exactly as
``load_embedder`` gives them (division by 255 and the model's input normalisation are
inside). The file also carries what it was exported from (run, input shape, distance):
TorchScript as the extra file ``dmlrun.json``, ONNX as metadata properties.

After writing, the export is run once on a batch of test images and compared with
``load_embedder``; a file that disagrees is not kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from dmlrun.errors import UserError, run_command

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-5  # largest |difference| accepted against load_embedder (float32 rounding)


def _uint8_model(embedder):
    import torch
    from torch import nn

    class Uint8Embedder(nn.Module):
        """(B, C, H, W) uint8 -> (B, D) float32 embeddings."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images.float() / 255.0).float()

    return Uint8Embedder(embedder.model).eval()


def _metadata(run, checkpoint: Path) -> dict:
    return {"dmlrun_run": str(checkpoint.parent.parent.resolve()),
            "dmlrun_checkpoint": str(checkpoint.resolve()),
            "input": json.dumps([run.channels, run.image_size, run.image_size]),
            "input_dtype": "uint8", "embedding_dim": str(run.dim),
            "distance": run.distance.name, "normalize": str(bool(run.distance.normalize))}


def export(path: str | Path, out: str | Path, fmt: str = "onnx", batch: int = 8) -> dict:
    """Write the run's model to ``out`` (a new file) in ``fmt``; returns what was written and
    the largest difference from ``load_embedder`` on ``batch`` images."""
    import torch

    from dmlrun.embedder import RunEmbedding

    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; refusing to overwrite it")
    run = RunEmbedding(path, "cpu")
    model = _uint8_model(run.embedder)
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (batch, run.channels, run.image_size, run.image_size),
                            dtype=torch.uint8, generator=g)
    meta = _metadata(run, run.checkpoint)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with torch.no_grad():
            (_torchscript if fmt == "torchscript" else _onnx)(model, example, tmp, meta)
            expected = run.embedder(example)
        got = torch.from_numpy(_run_file(tmp, fmt, example.numpy()))
        diff = float((got - expected).abs().max())
        if not diff <= TOLERANCE:
            raise UserError(f"the exported model differs from the run's by {diff:.3g} "
                            f"(> {TOLERANCE}); nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": str(out), "format": fmt, "max_abs_diff": diff, **meta}


def _torchscript(model, example, path: Path, meta: dict) -> None:
    import torch

    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export,
        warnings.simplefilter("ignore", FutureWarning)  # yet it is what C++ and Java load
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={"dmlrun.json": json.dumps(meta)})


def _onnx(model, example, path: Path, meta: dict) -> None:
    import torch

    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise UserError("ONNX export needs onnx and onnxscript: pip install "
                        "'dmlrun[export]'") from exc
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), input_names=["images"],
                                output_names=["embeddings"], dynamo=True,
                                dynamic_shapes={"images": {0: batch}}, verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _run_file(path: Path, fmt: str, images):
    """Embeddings of uint8 ``images`` (numpy) from the exported file."""
    if fmt == "torchscript":
        import torch

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("checking the ONNX file needs onnxruntime: pip install "
                        "'dmlrun[export]'") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmlrun-export",
        description="Write a trained model as one TorchScript or ONNX file: uint8 images "
                    "(B, C, H, W) in, float32 embeddings (B, D) out.",
        epilog="examples:\n"
               "  dmlrun-export outputs/2026-12-06/10-00-00 --format onnx --out model.onnx\n"
               "  dmlrun-export outputs/2026-12-06/10-00-00 --format torchscript --out model.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (best.pt, else last.pt) or a checkpoint file")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default) or "
                                                                     "torchscript")
    p.add_argument("--out", required=True, help="the file to write (must not exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("dmlrun-export", lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    result = export(args.run, args.out, args.format)
    print(f"wrote {result['file']} ({result['format']}): uint8 images "
          f"{json.loads(result['input'])} -> {result['embedding_dim']}-D embeddings "
          f"({result['distance']} distance); largest difference from the run's model "
          f"{result['max_abs_diff']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
