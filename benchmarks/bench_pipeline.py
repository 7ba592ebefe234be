"""Images/s of the ImageNet-style train pipeline: DALI (CPU decoder, "mixed" on a GPU) vs the torchvision
DataLoader, at equal worker threads, on generated ImageNet-sized JPEGs, measured side by side in one run.

    python benchmarks/bench_pipeline.py --threads 2 --images 768 --repeats 5

Rows: ``dali`` and ``torch`` are the loaders that ``build_data`` returns (ahbf.pipelines); ``torchvision``
is the textbook loader (ImageFolder, RandomResizedCrop, flip, ToTensor, Normalize in the workers).
Each repeat runs one epoch of every row in turn (interleaved, so that load from other processes hits all
rows alike); an epoch is timed whole, per-epoch start-up included, except DALI's per-epoch pipeline build
(timed apart, with the batch it prefetches: on a real epoch it is amortised); the first epoch (worker
start, page cache) is a warm-up. Images per CPU-second (this process and its workers, from /proc) are reported too:
unlike images/s they hardly depend on what else runs on the machine. The JPEGs are written to a
temporary folder and deleted afterwards. Results: benchmarks/results/pipeline_<device>.json / .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


from ahbf.pipelines.dali import DaliFolderLoader, dali_available  # noqa: E402
from machine import cpu_name  # noqa: E402
from ahbf.pipelines.folder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ahbf.pipelines.scan import scan_folder  # noqa: E402
from ahbf.pipelines.torch_folder import WORKER_START, TorchFolderLoader  # noqa: E402


def make_jpegs(root: str, n: int, classes: int = 8, width: int = 500, height: int = 375, quality: int = 90) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain), ~75 KB each at 500 x 375, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        field = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=quality)


class TextbookLoader:
    """The usual torchvision ImageNet train loader, float normalisation in the workers."""

    def __init__(self, root: str, *, batch_size: int, size: int, workers: int, device):
        from torchvision import datasets, transforms as T

        tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.device = torch.device(device)
        self.loader = torch.utils.data.DataLoader(datasets.ImageFolder(root, tf), batch_size=batch_size, shuffle=True,
                                                  num_workers=workers, pin_memory=self.device.type == "cuda",
                                                  persistent_workers=True, multiprocessing_context=WORKER_START)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(self.device)


def tree_cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its live descendants (DataLoader workers, the fork
    server), from /proc; 0 where /proc is missing."""
    try:
        stats = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in stats.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def time_builds(loader) -> list[float]:
    """Record the seconds of each DALI pipeline (re)build of ``loader`` (a DaliFolderLoader) in the returned list.

    The train loader builds a pipeline per epoch (the epoch's file order is part of it). That costs the same
    for a 768-image benchmark epoch as for a 1.28 M-image ImageNet epoch, so the benchmark times it apart
    instead of spreading it over a tiny epoch. The build includes DALI's prefetch of the first batch
    (``prepare_first_batch``); :func:`run_epoch` leaves that batch out of the count too."""
    builds: list[float] = []
    build = loader._build

    def timed(*args):
        t0 = time.perf_counter()
        out = build(*args)
        builds.append(time.perf_counter() - t0)
        return out
    loader._build = timed
    return builds


def run_epoch(loader, epoch: int, device, builds: list[float] | None = None) -> tuple[float, float, float, float]:
    """(seconds to the first batch, images/s, images per CPU-second, pipeline build seconds) of one epoch.

    The whole epoch is timed, including each loader's own per-epoch start (the DataLoader primes its
    persistent workers): timing from the first batch instead would favour the DataLoader, whose workers
    finish whole batches in parallel (several arrive at once at the start). The one exception is DALI's
    per-epoch pipeline build (``builds``, from :func:`time_builds`): its seconds and the batch it prefetches
    are left out of the images/s (and reported apart), since on a real epoch they are amortised away."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    loader.set_epoch(epoch)
    n_builds = len(builds) if builds is not None else 0
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    first, n, first_len = None, 0, 0
    for x, _ in loader:
        n += len(x)
        if first is None:
            sync()
            first, first_len = time.perf_counter() - t0, len(x)
    sync()
    seconds, cpu = time.perf_counter() - t0, tree_cpu_seconds() - cpu0
    build = sum(builds[n_builds:]) if builds is not None else 0.0
    if build:  # DALI: drop the build and the batch decoded inside it
        seconds, n = seconds - build, n - first_len
    return first, n / seconds, n / cpu if cpu > 0 else float("nan"), build


def versions() -> dict:
    import PIL
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "pillow": PIL.__version__}
    if dali_available():
        import nvidia.dali

        out["nvidia-dali"] = nvidia.dali.__version__
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=768, help="generated JPEGs (500 x 375, quality 90)")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5, help="epochs per row (interleaved); the first is a warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="dali,torch,torchvision")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="ahbf_bench_jpegs_") as tmp:
        t = time.perf_counter()
        make_jpegs(tmp, args.images)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t:.1f} s", flush=True)
        images = scan_folder(tmp)
        common = dict(train=True, batch_size=args.batch_size, size=args.size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      workers=args.threads, device=device)
        factories = {
            "dali": lambda: DaliFolderLoader(images, **common),
            "torch": lambda: TorchFolderLoader(images, **common),
            "torchvision": lambda: TextbookLoader(tmp, batch_size=args.batch_size, size=args.size,
                                                  workers=args.threads, device=device),
        }
        rows = [r for r in args.rows.split(",") if r]
        loaders = {r: factories[r]() for r in rows}
        builds = {r: time_builds(loaders[r]) if r == "dali" else None for r in rows}
        runs = {r: [] for r in rows}
        for rep in range(args.repeats):
            for r in rows:
                first, ips, per_cpu, build = run_epoch(loaders[r], rep, device, builds[r])
                runs[r].append((first, ips, per_cpu, build))
                print(f"  repeat {rep} {r:12s} {ips:7.1f} img/s  {per_cpu:6.1f} img per CPU-s  "
                      f"(first batch after {first:.2f} s, pipeline build {build:.2f} s)", flush=True)
    decoder = "mixed (GPU)" if device.type == "cuda" else "cpu"
    names = {"dali": f"DALI, decoder {decoder}, fn.decoders.image_random_crop",
             "torch": "torchvision DataLoader, ahbf fallback (uint8 in workers, normalise in main)",
             "torchvision": "torchvision DataLoader, textbook (ImageFolder, ToTensor + Normalize in workers)"}
    results = {}
    for r in rows:
        timed = runs[r][1:] or runs[r]  # the first epoch warms the page cache, allocators and workers
        ips = [x[1] for x in timed]
        results[r] = {"pipeline": names[r], "median_img_s": statistics.median(ips), "min_img_s": min(ips),
                      "max_img_s": max(ips), "img_per_cpu_s": statistics.median(x[2] for x in timed),
                      "first_batch_s": statistics.median(x[0] for x in runs[r]),
                      "pipeline_build_s": statistics.median(x[3] for x in runs[r]),
                      "runs_img_s": [round(x, 1) for x in ips]}
    base = next((results[r]["median_img_s"] for r in ("torchvision", "torch") if r in results), None)
    base_cpu = next((results[r]["img_per_cpu_s"] for r in ("torchvision", "torch") if r in results), None)
    for r in rows:
        results[r]["speedup_vs_" + ("torchvision" if "torchvision" in results else "torch")] = (
            round(results[r]["median_img_s"] / base, 2) if base else None)
        results[r]["cpu_efficiency_ratio"] = round(results[r]["img_per_cpu_s"] / base_cpu, 2) if base_cpu else None
    record = {
        "benchmark": "ImageNet-style train pipeline (random-resized crop 224, flip, normalise), images/s",
        "command": "python benchmarks/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "versions": versions(),
        "setup": {"images": args.images, "image_size": "500x375 JPEG q90", "batch_size": args.batch_size,
                  "crop": args.size, "threads": args.threads, "repeats": args.repeats, "warmup_repeats": 1},
        "results": results,
    }
    table = markdown(record)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"pipeline_{'gpu' if device.type == 'cuda' else 'cpu'}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(f"wrote {stem}.json and {stem}.md")
    return record


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"  # no baseline row in this run


def markdown(rec: dict) -> str:
    s = rec["setup"]
    speed_key = next(k for k in next(iter(rec["results"].values())) if k.startswith("speedup_vs_"))
    lines = [
        f"Train pipeline, {s['images']} JPEGs {s['image_size']} -> crop {s['crop']}, batch {s['batch_size']}, "
        f"{s['threads']} threads/workers, median of {s['repeats'] - s['warmup_repeats']} epochs after 1 warm-up.",
        f"{rec['cpu']} ({rec['cpu_count']} cores; 1-minute load average {rec['load_average_at_start'][0]:.2f} at start, "
        f"{rec['load_average_at_end'][0]:.2f} at end)"
        + (f", {rec['gpu']}" if rec["gpu"] else "") + f"; {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}; "
        f"{rec['date']}.",
        "",
        f"| pipeline | img/s (median) | min - max | {speed_key.replace('_', ' ')} | img per CPU-second | "
        "ratio | first batch (s) | pipeline build (s/epoch, not in img/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rec["results"].values():
        lines.append(f"| {r['pipeline']} | {r['median_img_s']:.0f} | {r['min_img_s']:.0f} - {r['max_img_s']:.0f} | "
                     f"{_x(r[speed_key])} | {r['img_per_cpu_s']:.0f} | {_x(r['cpu_efficiency_ratio'])} | "
                     f"{r['first_batch_s']:.2f} | {r.get('pipeline_build_s') or 0:.2f} |")
    lines += ["", "img/s: images over the wall-clock time of a whole epoch (what training sees; depends on other "
              "load). img per CPU-second: images over the CPU time used by the process and its workers "
              "(hardly depends on other load)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
