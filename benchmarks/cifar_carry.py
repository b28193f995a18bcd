"""CIFAR-10 onto a lent GPU that cannot download, in parts a device call can carry (64 MiB each).

  python benchmarks/cifar_carry.py split --zip ../shared/data/cifar10_png.zip --out .carry/cifar10
      decodes the PNG zip (train/<class>/*.png, test/<class>/*.png) into one compressed .npz
      (train_images, train_labels, test_images, test_labels: uint8 HWC and int64 labels in the
      standard class order), cut into .carry/cifar10/<i>/part (each under --max_mib) beside a
      manifest.json (the whole file's sha256, the parts' sizes and sha256)
  python benchmarks/cifar_carry.py join --parts /tmp/edgepopup_carry --out /tmp/cifar10.npz
      on the device, after one call per part: checks every part and the whole, then writes the
      .npz (data.name=npz reads it)

--per_class_train/--per_class_test take the first N images of each class (sorted by name), for a
quick check of the whole sequence on a CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pathlib
import sys
import zipfile

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MANIFEST = "manifest.json"


def _split_arrays(archive: zipfile.ZipFile, split: str, per_class: int | None):
    from PIL import Image
    names = sorted(n for n in archive.namelist() if n.lower().endswith(".png"))
    images, labels = [], []
    for label, cls in enumerate(CLASSES):
        files = [n for n in names if pathlib.PurePosixPath(n).parts[-3:-1] == (split, cls)]
        if not files:
            raise SystemExit(f"error: no {split}/{cls}/*.png in the zip")
        for name in files[:per_class]:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                images.append(np.asarray(image.convert("RGB"), np.uint8))
            labels.append(label)
        print(f"  {split}/{cls}: {min(len(files), per_class or len(files))} images", flush=True)
    return np.stack(images), np.array(labels, np.int64)


def split(args) -> None:
    with zipfile.ZipFile(args.zip) as archive:
        arrays = {}
        for name, per_class in (("train", args.per_class_train), ("test", args.per_class_test)):
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = _split_arrays(archive, name, per_class)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    size = args.max_mib * 2**20
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    manifest = {"file": "cifar10.npz", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": [{"bytes": len(p), "sha256": hashlib.sha256(p).hexdigest()} for p in parts],
                "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    out = pathlib.Path(args.out)
    for i, part in enumerate(parts):
        folder = out / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part{i:03d}").write_bytes(part)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"{len(data) / 2**20:.1f} MiB in {len(parts)} parts under {out}/0 .. {out}/{len(parts) - 1}")


def join(args) -> None:
    folder = pathlib.Path(args.parts)
    manifest = json.loads((folder / MANIFEST).read_text())
    chunks = []
    for i, expected in enumerate(manifest["parts"]):
        path = folder / f"part{i:03d}"
        if not path.exists():
            raise SystemExit(f"error: {path} is missing: carry part {i} first "
                             f"({len(manifest['parts'])} parts in all)")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != expected["sha256"]:
            raise SystemExit(f"error: {path} is damaged (sha256 differs): carry it again")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit("error: the joined file's sha256 differs from the manifest's")
    tmp = pathlib.Path(args.out + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(data) / 2**20:.1f} MiB, {manifest['shapes']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("split", help="the zip -> parts to carry")
    s.add_argument("--zip", required=True)
    s.add_argument("--out", default=".carry/cifar10")
    s.add_argument("--max_mib", type=int, default=60)
    s.add_argument("--per_class_train", type=int, default=None)
    s.add_argument("--per_class_test", type=int, default=None)
    j = sub.add_parser("join", help="the carried parts -> the .npz")
    j.add_argument("--parts", required=True)
    j.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.what == "split" and not 1 <= args.max_mib <= 63:
        parser.error("--max_mib must be in [1, 63]: a device call carries at most 64 MiB")
    split(args) if args.what == "split" else join(args)


if __name__ == "__main__":
    sys.exit(main())
