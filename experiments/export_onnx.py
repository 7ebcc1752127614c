"""Export the official U²-Net / U²-Net-p and FBA Matting PyTorch checkpoints to ONNX.

Not needed for U²-Net(-p): `csearch models fetch u2netp` (or `u2net`) downloads rembg's ONNX
export of the authors' weights, checked against its pinned digest. This script is for FBA
Matting (published only as a PyTorch checkpoint, under a non-commercial licence) and for
re-exporting U²-Net at other sizes. EfficientNet-Lite0, the default extractor, is built by
`csearch models fetch efficientnet_lite0` from Google's release (`csearch/models/convert.py`).

Needs `torch` and a checkout of the authors' code (neither is a csearch dependency; this script
is not run in CI). The exported files have the interfaces `csearch.localize` validates:

  U²-Net(-p): input `input.1` float32 [1,3,H,W] (RGB / 255, ImageNet mean/std); 7 outputs
              `d0`..`d6` [1,1,H,W], the first the fused saliency in [0,1].
  FBA:        inputs `image` [1,3,H,W] (RGB in [0,1]), `two_chan_trimap` [1,2,H,W] (bg, fg one-hot),
              `image_n` [1,3,H,W] (ImageNet-normalised), `trimap_transformed` [1,6,H,W];
              output `output` [1,7,H,W] = alpha, fg RGB, bg RGB. H, W multiples of 8.

H and W are exported symbolic (`--fixed` keeps them at --size, like the published u2netp.onnx).

Usage:
    git clone https://github.com/xuebinqin/U-2-Net          # weights: see its README
    python experiments/export_onnx.py u2netp --repo U-2-Net --checkpoint u2netp.pth --out u2netp.onnx
    python experiments/export_onnx.py u2net  --repo U-2-Net --checkpoint u2net.pth  --out u2net.onnx
    git clone https://github.com/MarcoForte/FBA_Matting     # weights: non-commercial licence
    python experiments/export_onnx.py fba --repo FBA_Matting --checkpoint FBA.pth --out fba_matting.onnx

Then install them with `csearch models fetch fba --from DIR` (DIR: the folder holding
fba_matting.onnx), or pass them as localize.model / localize.matting_model. Each export is
checked: ONNX Runtime must reproduce the PyTorch output (max abs difference printed) and
csearch's loader must accept the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from csearch.models.onnx_runtime import onnx_session  # noqa: E402 - needs REPO on the path; no torch, no Keras
from csearch.models.registry import get_spec  # noqa: E402

U2NET_OUTPUTS = [f"d{i}" for i in range(7)]
FBA_INPUTS = list(get_spec("fba").onnx_inputs)  # the names csearch.localize feeds
TOLERANCE = 1e-3


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("this script needs PyTorch: pip install torch (CPU wheels are enough)") from None
    return torch


def _load_state(torch, checkpoint: Path) -> dict:
    state = torch.load(str(checkpoint), map_location="cpu")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints


def build_u2net(variant: str, repo: Path, checkpoint: Path):
    torch = _import_torch()
    sys.path.insert(0, str(repo))
    from model import U2NET, U2NETP  # the authors' code, from --repo

    net = (U2NETP if variant == "u2netp" else U2NET)(3, 1)
    net.load_state_dict(_load_state(torch, checkpoint))
    return net.eval()


def build_fba(repo: Path, checkpoint: Path):
    _import_torch()
    sys.path.insert(0, str(repo))
    from networks.models import build_model  # the authors' code, from --repo

    return build_model(str(checkpoint)).eval()


def u2net_example(variant: str, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {get_spec(variant).onnx_inputs[0]: rng.normal(0, 1, (1, 3, size, size)).astype(np.float32)}


def fba_example(size: int) -> dict[str, np.ndarray]:
    """Realistic inputs built with csearch's own preprocessing, so the check covers it too."""
    from csearch.localize.matting import fba_inputs, make_trimap

    yy, xx = np.mgrid[:size, :size]
    saliency = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2).astype(np.float32)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype(np.uint8)
    return fba_inputs(image, make_trimap(saliency, 0.5, 21))


def export(net, feeds: dict[str, np.ndarray], outputs: list[str], out: Path, opset: int, fixed: bool) -> None:
    torch = _import_torch()
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    dynamic = None if fixed else {name: {2: "height", 3: "width"} for name in [*feeds, *outputs]}
    with torch.no_grad():
        torch.onnx.export(
            net,
            args,
            str(out),
            input_names=list(feeds),
            output_names=outputs,
            opset_version=opset,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
        reference = net(*args)
    reference = reference[0] if isinstance(reference, (tuple, list)) else reference
    verify(out, feeds, reference.numpy())


def verify(out: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> None:
    session = onnx_session(out, "the exported network")  # as csearch will run it
    got = session.run([session.get_outputs()[0].name], feeds)[0]
    diff = float(np.abs(got - reference).max())
    print(f"{out}: onnxruntime vs torch, first output max abs diff {diff:.2e}")
    if diff > TOLERANCE:
        raise SystemExit(f"{out}: export does not reproduce the PyTorch output (diff {diff:.2e} > {TOLERANCE})")


def check_interface(kind: str, out: Path, size: int) -> None:
    """The file must load through csearch's own validation."""
    from csearch.localize import FBAMatting, U2NetSaliency

    model = FBAMatting(out) if kind == "fba" else U2NetSaliency(out, input_size=size, model=kind)
    print(f"{out}: accepted by csearch ({type(model).__name__})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export U²-Net / U²-Net-p / FBA checkpoints to ONNX (needs torch and the authors' code).",
        epilog=__doc__.split("Usage:")[1].split("Then install")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=["u2netp", "u2net", "fba"], help="which network the checkpoint is")
    parser.add_argument("--repo", type=Path, required=True, help="checkout of the authors' code")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the .pth weights")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--size", type=int, default=320, help="example input side (default 320)")
    parser.add_argument("--opset", type=int, default=11, help="ONNX opset (default 11, as the published exports)")
    parser.add_argument("--fixed", action="store_true", help="keep H, W fixed at --size instead of symbolic")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.repo, "--repo"), (args.checkpoint, "--checkpoint")):
        if not path.exists():
            raise SystemExit(f"{what} {path} does not exist")
    if args.size % 32:
        raise SystemExit("--size must be a multiple of 32")
    if args.model == "fba":
        export(
            build_fba(args.repo, args.checkpoint), fba_example(args.size), ["output"], args.out, args.opset, args.fixed
        )
    else:
        export(
            build_u2net(args.model, args.repo, args.checkpoint),
            u2net_example(args.model, args.size),
            U2NET_OUTPUTS,
            args.out,
            args.opset,
            args.fixed,
        )
    check_interface(args.model, args.out, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
