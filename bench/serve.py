"""Load on `rlr serve`, side by side with the in-process scoring path of `rlr predict`.

    python -m bench.serve --run RUN --images DIR_OR_FILES... [--seconds 30] [--concurrency 1,4,16]

Starts `rlr serve` on a free loopback port, then for each concurrency level keeps that many clients
posting one image each (multipart, overlay included, as the page asks) for a bounded time, and
reports images/s, p50/p95 latency, how many requests were answered (and with what status) and the
server's resident memory before and after. The same images are then scored in this process with
`rlr.load(RUN).predict` (what `rlr predict` runs, without its file output). Writes
bench/results/<machine>/serve.json and serve.md (or --out DIR). Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

from rlr.atomic import atomic_write_json, atomic_write_text

from rlr.serve import running_server

from .common import machine_info, machine_name


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _multipart(name: str, data: bytes) -> tuple:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, name: str, data: bytes) -> int:
    body, content_type = _multipart(name, data)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def load_phase(url: str, images: list, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients post one image each, back to back, for ``seconds``."""
    latencies, statuses, lock = [], {}, threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int):
        i = offset
        while time.perf_counter() < stop_at:
            name, data = images[i % len(images)]
            start = time.perf_counter()
            status = _post(url, name, data)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
            i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = statuses.get(200, 0)
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"concurrency": concurrency, "seconds": round(wall, 2), "requests": len(latencies),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "images_per_s": round(ok / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1), "p95_ms": round(1000 * cuts[18], 1)}


def in_process(run: str, paths: list, repeats: int) -> dict:
    from rlr.inference import load

    detector = load(run, device="cpu")
    detector.predict(paths[:2])                      # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        detector.predict(paths)
    wall = time.perf_counter() - start
    return {"images": len(paths) * repeats, "seconds": round(wall, 2),
            "images_per_s": round(len(paths) * repeats / wall, 2)}


def write_markdown(path: Path, result: dict) -> None:
    lines = [f"# rlr serve under load ({result['machine']['cpu_model']}, {result['machine']['torch_threads']} threads)", "",
             f"Command: `{result['command']}`. Images: {result['images']} ({result['image_size']}). "
             f"Server RSS {result['rss_mb']['start']:.0f} MiB after warm-up, {result['rss_mb']['end']:.0f} MiB "
             f"at the end.", "",
             "| path | clients | requests answered (status: count) | images/s | p50 latency | p95 latency | server RSS after |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for phase in result["serve"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in phase["statuses"].items())
        lines.append(f"| rlr serve, POST /predict (one image, overlay) | {phase['concurrency']} | "
                     f"{phase['requests']} ({statuses}) | {phase['images_per_s']} | {phase['p50_ms']} ms | "
                     f"{phase['p95_ms']} ms | {phase['rss_mb_after']:.0f} MiB |")
    p = result["in_process"]
    lines.append(f"| rlr.load().predict in process (rlr predict's scoring) | – | {p['images']} images | "
                 f"{p['images_per_s']} | – | – | – |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    from rlr.inference import collect_images

    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--seconds", type=float, default=30.0, help="load time per concurrency level (30)")
    p.add_argument("--concurrency", default="1,4,16,16",
                   help="comma-separated client counts, one phase each (1,4,16,16: the repeat shows whether memory "
                        "keeps growing at the same load)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<machine>/)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = collect_images(args.images)
    images = [(Path(x).name, Path(x).read_bytes()) for x in paths]
    device = torch.device("cpu")
    out = args.out or Path(__file__).resolve().parent / "results" / machine_name(device)
    out.mkdir(parents=True, exist_ok=True)

    with running_server(args.run, extra_args=("--device", "cpu"), timeout=300) as server:
        url = server.url
        for name, data in images[:4]:                # warm-up
            _post(url + "predict", name, data)
        rss_start = _rss_mb(server.pid)
        phases = []
        for level in levels:
            phase = load_phase(url + "predict", images, level, args.seconds)
            phase["rss_mb_after"] = round(_rss_mb(server.pid), 1)
            print(json.dumps(phase), flush=True)
            phases.append(phase)
        rss_end = _rss_mb(server.pid)
    local = in_process(args.run, paths, repeats=max(1, 64 // len(paths)))
    print(json.dumps({"in_process": local}), flush=True)
    from PIL import Image

    with Image.open(paths[0]) as first:
        size = f"{first.size[0]}x{first.size[1]} px"
    result = {"machine": machine_info(device),
              "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
              "images": len(paths), "image_size": size, "serve": phases, "in_process": local,
              "rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)}}
    atomic_write_json(out / "serve.json", result)
    write_markdown(out / "serve.md", result)
    print(f"-> {out / 'serve.json'}, {out / 'serve.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
