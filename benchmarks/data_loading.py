"""Data-layer speed: ``prepare`` time, Dataset samples/s with 0 and 2 DataLoader workers, NPY-vs-HDF5 row reads.

Usage::

    python benchmarks/data_loading.py [--src ../shared/data/lidc-idri-slices] [--store DIR] [--samples 2048]

Without ``--store`` the LIDC source is prepared into a temporary folder first (and that time is printed).
The HDF5 comparison writes the same ``images``/``masks`` arrays into one HDF5 file (per-row chunks, uncompressed
and gzip-1) and times the same random single-row reads as the Dataset does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _default_src() -> Path:
    env = os.environ.get("PROSEG_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    return base / "lidc-idri-slices"


def loader_rate(store_path: Path, workers: int, samples: int, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from proseg.data.augment import AugmentConfig
    from proseg.data.dataset import MultiRaterDataset, seed_worker

    ds = MultiRaterDataset(store_path, augment=AugmentConfig(), seed=0)
    sampler = RandomSampler(ds, num_samples=samples, generator=torch.Generator().manual_seed(0))
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, worker_init_fn=seed_worker)
    t = time.perf_counter()
    n = 0
    for batch in dl:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t)


def row_read_rates(store_path: Path, reads: int, tmp: Path) -> dict[str, float]:
    """Random single-row reads (image + masks) per second: NPY memmap vs HDF5 (uncompressed / gzip-1)."""
    import h5py

    from proseg.data.store import open_store

    s = open_store(store_path)
    n = len(s)
    rows = np.random.default_rng(0).integers(0, n, reads)
    out: dict[str, float] = {}
    t = time.perf_counter()
    for r in rows:
        np.array(s.images[r])
        np.array(s.masks[r])
    out["npy-memmap"] = reads / (time.perf_counter() - t)
    for comp in (None, "gzip"):
        p = tmp / f"cmp-{comp}.h5"
        with h5py.File(p, "w") as f:
            kw = {"compression": comp, "compression_opts": 1} if comp else {}
            f.create_dataset("images", data=s.images, chunks=(1, *s.images.shape[1:]), **kw)
            f.create_dataset("masks", data=s.masks, chunks=(1, *s.masks.shape[1:]), **kw)
        with h5py.File(p, "r") as f:
            im, mk = f["images"], f["masks"]
            t = time.perf_counter()
            for r in rows:
                im[int(r)]
                mk[int(r)]
            out[f"hdf5-{comp or 'raw'}"] = reads / (time.perf_counter() - t)
        p.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=_default_src())
    ap.add_argument("--store", type=Path, default=None, help="an already prepared store (skips prepare)")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reads", type=int, default=4000)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="proseg-bench-") as td:
        tmp = Path(td)
        store = args.store
        if store is None:
            from proseg.data.prepare import prepare

            if not args.src.is_dir():
                raise SystemExit(f"{args.src}: LIDC source not found (pass --src or --store)")
            res = prepare("lidc-kaggle", args.src, tmp / "lidc")
            store = res.out
            print(f"prepare lidc-kaggle: {res.rows} slices, {res.patients} patients in {res.seconds:.1f} s "
                  f"({res.rows / res.seconds:.0f} slices/s)")
        import torch

        threads = torch.get_num_threads()
        for workers in (0, 2):
            rate = loader_rate(store, workers, args.samples, args.batch_size)
            print(f"MultiRaterDataset + augmentation, {workers} workers: {rate:.0f} samples/s "
                  f"(main process torch threads {threads})")
        # collate's torch.stack in the main process spins on an oversubscribed machine; workers use 1 thread
        torch.set_num_threads(1)
        rate = loader_rate(store, 0, args.samples, args.batch_size)
        print(f"MultiRaterDataset + augmentation, 0 workers: {rate:.0f} samples/s (main process torch threads 1)")
        torch.set_num_threads(threads)
        for name, rate in row_read_rates(store, args.reads, tmp).items():
            print(f"random row read ({name}): {rate:.0f} rows/s")


if __name__ == "__main__":
    main()
