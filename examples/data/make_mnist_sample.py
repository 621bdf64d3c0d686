"""Rebuild the embedded MNIST sample from the full MNIST files (provenance, see README.md).

Usage: python examples/data/make_mnist_sample.py --raw-dir ../shared/datasets/MNIST/raw
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
from pathlib import Path

N_TRAIN = 5000
N_TEST = 1000


def _write_subset(src: Path, dst: Path, count: int) -> None:
    raw = src.read_bytes()
    magic = struct.unpack(">I", raw[:4])[0]
    ndim = magic & 0xFF
    dims = list(struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim]))
    item = 1
    for d in dims[1:]:
        item *= d
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * ndim, count, *dims[1:])
    body = raw[4 + 4 * ndim : 4 + 4 * ndim + count * item]
    # mtime=0 keeps the archive byte-identical across rebuilds.
    with gzip.GzipFile(dst, "wb", compresslevel=9, mtime=0) as f:
        f.write(header + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "mnist_sample")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", N_TRAIN), ("t10k", N_TEST)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            src = args.raw_dir / name
            print(name, hashlib.sha256(src.read_bytes()).hexdigest())
            _write_subset(src, args.out_dir / f"{name}.gz", count)


if __name__ == "__main__":
    main()
