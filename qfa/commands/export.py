"""Export a subnet: standalone static quantized model (no supernet needed to load it), ONNX with
QuantizeLinear/DequantizeLinear, and an .npz of integer weights and quantization parameters.

The subnet is recalibrated on the supernet first (BN and BatchQuant statistics, spec 3). Both
exports are checked on a held-out batch: the standalone model must reproduce the supernet's
outputs bit for bit; the ONNX model (onnxruntime) must give logits within --onnx-atol of PyTorch's on
at least --onnx-min-match of the images. Not on all: onnxruntime rounds in another order than PyTorch,
so an activation within float32 rounding of a bin edge can quantize one step away (spec 4 allows it
between backends; see qfa/export/onnx_export.py), and that step changes that image's logits by up to
a few tenths on a small network. A broken export moves every image; a bin flip, a few.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qfa
from qfa.calibrate import resize
from qfa.commands.flags import add_subnets_arg
from qfa.config import SubnetConfig
from qfa.export.onnx_export import export_onnx, run_onnx, save_deployment_npz
from qfa.export.standalone import export_subnet, load_standalone
from qfa.io import TMP_PREFIX, atomic_write_text, read_text, remove_stale_temps
from qfa.search.runtime import add_supernet_arguments, load_model, make_loaders, resolve_device
from qfa.train.evaluation import with_resolution


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_supernet_arguments(p)
    add_subnets_arg(
        p,
        help="the subnet: a SubnetConfig JSON file, a collected record, or a qfa search result (with --index); "
        "None: the subnet qfa calibrate calibrated the --checkpoint for",
    )
    p.add_argument("--config", dest="subnet_config_typo", help=argparse.SUPPRESS)  # the old spelling of --subnets
    p.add_argument("--index", type=int, default=None, help="which front entry of a search result to export")
    p.add_argument("--resolution", type=int, default=None, help="input size; None: the config's resolution")
    p.add_argument("--out-dir", required=True, help="writes subnet.pt, subnet.onnx, subnet.npz, export.json")
    p.add_argument("--name", default="subnet", help="file name stem of the exported files")
    p.add_argument(
        "--no-onnx", action="store_true", help="skip the ONNX and .npz exports (an older NAME.onnx/.npz is removed)"
    )
    p.add_argument("--onnx-atol", type=float, default=1e-3, help="max |ONNX - PyTorch| logit difference of an image")
    p.add_argument(
        "--onnx-min-match",
        type=float,
        default=0.9,
        help="fraction of the checked images whose logits must all lie within --onnx-atol (others: bin-edge flips)",
    )


def read_config(path: str | Path, index: int | None = None) -> SubnetConfig:
    """A SubnetConfig from a config JSON file or from entry ``index`` of a search result's front."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--subnets: file not found: {path}")
    try:
        data = json.loads(read_text(path, "--subnets"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--subnets: {path} is not JSON ({exc})") from exc
    if isinstance(data, dict) and "front" in data:
        front = data["front"]
        if index is None or not 0 <= index < len(front):
            raise ValueError(
                f"--subnets {path} is a search result with {len(front)} front entries: pass --index 0..{len(front) - 1}"
            )
        data = front[index]["config"]
    elif index is not None:
        raise ValueError("--index only applies to a search result (a JSON with a 'front' list)")
    if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
        data = data["config"]  # a single search entry or collected record
    return SubnetConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    if not args.onnx_atol >= 0:
        raise ValueError(f"--onnx-atol must be >= 0, got {args.onnx_atol}")
    if not 0 <= args.onnx_min_match <= 1:
        raise ValueError(f"--onnx-min-match must be in [0, 1], got {args.onnx_min_match}")
    if args.subnet_config_typo is not None:
        raise ValueError("--config is for option files: give the subnet config with --subnets FILE")
    cfg = read_config(args.subnets, args.index) if args.subnets else None
    device = resolve_device(args.device)
    model = load_model(args, device)
    if cfg is None:
        if args.checkpoint_subnet is None:
            raise ValueError(
                "--subnets is required: --checkpoint was not written by qfa calibrate (which records its subnet)"
            )
        cfg = SubnetConfig.from_dict(args.checkpoint_subnet)
    model.space.check_config(cfg)  # a config of another supernet fails here, naming the field
    if args.resolution is None and cfg.resolution is None:
        raise ValueError("the config has no resolution: pass --resolution")
    name = f"of {args.subnets}" if args.subnets else "of --checkpoint"
    resolution = with_resolution(name, cfg, args.resolution, model.space.resolutions).resolution
    calib, val = make_loaders(args, model, device)
    model.set_active_config(cfg)
    qfa.calibrate(model, calib, num_batches=args.calib_batches, resolution=resolution)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of an export killed mid-way (one export per out_dir at a time: export.json)
    # Every file is made and checked in a staging directory first, then moved into place, so that a
    # failed export leaves the previous set in out_dir as it was, never a mix of old and new files.
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=f"{TMP_PREFIX}export-{args.name}."))
    try:
        report = _export_into(stage, args, model, cfg, resolution, val, device)
        _install(stage, out_dir, args.name, report)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(_summary(report, out_dir))
    onnx_report = report.get("onnx")
    if onnx_report is not None and not onnx_report["passed"]:
        print(
            f"qfa export: error: the ONNX model's logits are within --onnx-atol {args.onnx_atol} of PyTorch's on "
            f"{onnx_report['images_within_atol']:.1%} of the images < --onnx-min-match {args.onnx_min_match:.1%} "
            f"(max |diff| {onnx_report['max_abs_diff']:.3g}; the files are written, see {out_dir / 'export.json'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _summary(report: dict[str, Any], out_dir: Path) -> str:
    """One line: what was written and how the checks went (the full report is OUT_DIR/export.json)."""
    onnx = report.get("onnx")
    paths = [report["standalone"]["path"]] + ([onnx["path"], onnx["npz"]] if onnx else [])
    files = [Path(p).name for p in paths]
    check = "standalone exact"
    if onnx is not None:
        check += f", ONNX {onnx['images_within_atol']:.0%} of images within --onnx-atol"
    mflops = report["costs"].get("lut_flops", float("nan")) / 1e6
    return (
        f"exported {', '.join(files)} to {out_dir} ({report['config']['resolution']} px, {mflops:.3f} MLUT-FLOPs; "
        f"{check}); report: {out_dir / 'export.json'}"
    )


def _export_into(
    stage: Path,
    args: argparse.Namespace,
    model: torch.nn.Module,
    cfg: SubnetConfig,
    resolution: int,
    val: Any,
    device: torch.device,
) -> dict[str, Any]:
    """Write the exports into ``stage`` and check them; the report names their final paths."""
    out_dir = Path(args.out_dir)
    pt_path = stage / f"{args.name}.pt"
    export_subnet(model, pt_path, resolution=resolution, checkpoint=str(args.checkpoint), data=str(args.data))
    images = resize(next(iter(val))[0], resolution)
    with torch.no_grad():
        reference = model(images)
        standalone = load_standalone(pt_path, backend=args.backend, map_location=device)(images)
    if not torch.equal(standalone, reference):
        diff = (standalone - reference).abs().max().item()
        raise RuntimeError(f"the standalone model does not reproduce the supernet (max |diff| {diff:.3g}): a bug")
    report: dict[str, Any] = {
        "config": cfg.to_dict() | {"resolution": resolution},
        "standalone": {"path": str(out_dir / pt_path.name), "exact": True},
        "costs": {k: float(v[0]) for k, v in qfa.cost.CostModel(model).evaluate_batch([cfg]).items()},
    }
    if not args.no_onnx:
        onnx_path, npz_path = stage / f"{args.name}.onnx", stage / f"{args.name}.npz"
        net = load_standalone(pt_path, map_location="cpu")
        export_onnx(net, onnx_path, resolution, metadata={"checkpoint": str(args.checkpoint)})
        save_deployment_npz(net, npz_path)
        ref = reference.float().cpu().numpy()
        got = run_onnx(onnx_path, images.float().cpu().numpy())
        image_diff = np.abs(got - ref).max(axis=1)
        matched = float((image_diff <= args.onnx_atol).mean())
        report["onnx"] = {
            "path": str(out_dir / onnx_path.name),
            "npz": str(out_dir / npz_path.name),
            "max_abs_diff": float(image_diff.max()),
            "median_image_max_abs_diff": float(np.median(image_diff)),
            "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "images": int(len(ref)),
            "atol": args.onnx_atol,
            "images_within_atol": matched,
            "min_match": args.onnx_min_match,
            "passed": matched >= args.onnx_min_match,
        }
    return report


def _install(stage: Path, out_dir: Path, name: str, report: dict[str, Any]) -> None:
    """Move the staged files over the previous export of ``name``. export.json goes first and comes
    back last, so a present export.json always describes the files beside it; an older
    ``name.onnx``/``.npz`` that this export did not make (``--no-onnx``) is removed with it."""
    (out_dir / "export.json").unlink(missing_ok=True)
    for suffix in (".pt", ".onnx", ".npz"):
        staged, target = stage / f"{name}{suffix}", out_dir / f"{name}{suffix}"
        if staged.exists():
            os.replace(staged, target)
        else:
            target.unlink(missing_ok=True)
    atomic_write_text(out_dir / "export.json", json.dumps(report, indent=2) + "\n")
