"""The served model under load and faults, against the same pipeline called in-process.

python -m benchmarks.serve_load <model folder> [--minutes 10] [--clients 8]
       [--data ../shared/data]

On the loopback interface only: `mlflow models serve -m <model folder> --env-manager local`,
then
  in-process   predict_images on the same requests, one after another (the baseline)
  load         --clients threads, each sending requests of 1-16 real X-rays (the local test
               images at 224 px and the three full-size samples) back to back for --minutes;
               per minute: requests/s, images/s, p50/p99 latency, the server's resident memory
               (every process of its group), failed requests
  kill         a 16-image request in flight, the server's process group killed with SIGKILL:
               how the client ends and how long it took; then a restarted server answers
  refusals     a 200 MB body and a 10,000-image request: status, message, seconds
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import SHARED_DATA, header
from pneumonia.serving import load_pipeline, predict_images
from tests import servers


def _images(data: Path) -> list[str]:
    files = sorted((data / "kermany224" / "test").rglob("*.jpeg")) + sorted(
        (data / "samples").glob("*.jpeg"))
    return [base64.b64encode(f.read_bytes()).decode() for f in files]


def _post(url: str, values: list[str], timeout: float = 300) -> tuple[int, str]:
    body = json.dumps({"dataframe_records": [{"image": v} for v in values]}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
            failed = [r["error"] for r in answer["predictions"]
                      if r["error"] and not r["error"].startswith("out of distribution")]
            return response.status, "; ".join(failed)
    except urllib.error.HTTPError as err:
        return err.code, err.read()[:300].decode(errors="replace")


def _rss_mb(pgid: int) -> float:
    """Resident memory of every live process of the group, in MB."""
    total = 0
    for pid in servers.group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _serve(model: Path, port: int, log: Path):
    process = servers.start([servers.MLFLOW, "models", "serve", "-m", str(model),
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], log)
    servers.wait_ready(process, f"http://127.0.0.1:{port}/ping", log)
    return process


def in_process(model: Path, images: list[str], seconds: float, seed: int = 0) -> float:
    """Images/s of predict_images on requests like the load's, one after another."""
    pipeline = load_pipeline(str(model), None, None, Path("/tmp/unused"))
    rng, done, start = random.Random(seed), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        values = rng.choices(images, k=rng.randint(1, 16))
        predict_images(pipeline, values)
        done += len(values)
    return done / (time.perf_counter() - start)


def load(url: str, images: list[str], clients: int, minutes: float, pgid: int) -> list[dict]:
    """Per minute: requests, images, latencies, failures, and the server's RSS at its end."""
    records, failures, lock, start = [], [], threading.Lock(), time.monotonic()
    deadline = start + minutes * 60

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            values = rng.choices(images, k=rng.randint(1, 16))
            sent = time.monotonic()
            try:
                status, error = _post(url, values)
            except OSError as err:
                status, error = 0, str(err)
            with lock:
                records.append((time.monotonic() - start, time.monotonic() - sent, len(values),
                                status == 200 and not error))
                if (status != 200 or error) and not failures:
                    failures.append(f"{status} {error}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    memory = []
    for minute in range(1, int(np.ceil(minutes)) + 1):
        time.sleep(max(0.0, start + minute * 60 - time.monotonic()))
        memory.append(_rss_mb(pgid))
    for t in threads:
        t.join()
    rows = []
    for minute, rss in enumerate(memory):
        done = [r for r in records if minute * 60 <= r[0] < (minute + 1) * 60]
        latencies = sorted(r[1] for r in done) or [float("nan")]
        rows.append({"minute": minute + 1, "requests/s": len(done) / 60,
                     "images/s": sum(r[2] for r in done) / 60,
                     "p50 s": statistics.median(latencies),
                     "p99 s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                     "RSS MB": rss, "failed": sum(not r[3] for r in done)})
    if failures:
        print(f"first failure: {failures[0][:300]}")
    return rows


def kill_and_restart(model: Path, process, port: int, log: Path, images: list[str]):
    """SIGKILL the server's group while a 16-image request is in flight; then restart it."""
    url, outcome = f"http://127.0.0.1:{port}/invocations", {}

    def request() -> None:
        sent = time.monotonic()
        try:
            outcome["answer"] = _post(url, images[:16], timeout=120)
        except OSError as err:
            outcome["answer"] = f"{type(err).__name__}: {err}"
        outcome["seconds"] = time.monotonic() - sent

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    thread.join(timeout=150)
    restarted = time.monotonic()
    process = _serve(model, port, log.with_name(f"{log.stem}-restarted.log"))
    status, error = _post(url, images[16:20])
    return process, {"client got": str(outcome.get("answer", "no answer (hung)"))[:120],
                     "client seconds": outcome.get("seconds", float("nan")),
                     "restart s": time.monotonic() - restarted,
                     "next request": f"{status} {error or 'ok'}"}


def refusals(url: str) -> list[tuple[str, int, str, float]]:
    rows = []
    for name, values in (("200 MB body", ["A" * (50 * 2**20)] * 4),
                         ("10,000 images", [""] * 10_000)):
        sent = time.monotonic()
        status, message = _post(url, values)
        rows.append((name, status, message[:160], time.monotonic() - sent))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model folder (evaluate.py's <output>/model)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--log", type=Path, default=Path("/tmp/serve_load.log"))
    args = parser.parse_args()
    header(f"{args.clients} clients, {args.minutes} min, 1-16 images a request")
    images = _images(args.data)
    print(f"{len(images)} real X-rays; in-process baseline ...", flush=True)
    baseline = in_process(args.model, images, 60)
    port = servers.free_port()
    process = _serve(args.model, port, args.log)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        rows = load(url, images, args.clients, args.minutes, process.pid)
        print("\n| minute | requests/s | images/s | p50 s | p99 s | server RSS MB | failed |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['minute']} | {r['requests/s']:.2f} | {r['images/s']:.2f} | "
                  f"{r['p50 s']:.2f} | {r['p99 s']:.2f} | {r['RSS MB']:.0f} | {r['failed']} |")
        served = sum(r["images/s"] for r in rows) / len(rows)
        print(f"\nimages/s: served {served:.2f}, in-process {baseline:.2f} "
              f"(served / in-process {served / baseline:.2f}x); failed requests "
              f"{sum(r['failed'] for r in rows)}")
        print("\n| refused | status | message | seconds |\n|---|---|---|---|")
        for name, status, message, seconds in refusals(url):
            print(f"| {name} | {status} | {message} | {seconds:.1f} |")
        process, killed = kill_and_restart(args.model, process, port, args.log, images)
        print("\nSIGKILL mid-request: " + "; ".join(
            f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in killed.items()))
    finally:
        servers.stop(process)


if __name__ == "__main__":
    main()
