"""Benchmark 8: the OpenAI-compatible server under concurrent clients, one process vs Ray Serve with 2 replicas.

On the CPU benchmark model (random LLaVA-OneVision layout, `common.build_model`; its LLM's linear weights redrawn
with std 0.1 and its answers kept to tokens that print, so that answers differ by video and question and stream as
text; wrapped with its slow-fast adapter, gates opened), `--clients` concurrent clients (1, 4, 16) ask `--questions`
questions about each of `--videos` videos (mp4 files in a media folder), every request streamed (`stream: true`,
greedy, `--tokens` tokens). Per cell: throughput (requests/s), p50/p95 latency (request sent -> last chunk) and
p50/p95 time to first token (request sent -> first text chunk).

Servers, all in this one run, one after the other:
- one process (`slowfast-adapter serve`, a separate process, torch with all `--threads`) with batching on/off
  (`--max-batch-size 8` / `1`) and the encode cache on/off (`--cache-gb 4` / `0`);
- Ray Serve, 2 replicas of 1 CPU and 1 torch thread each (`serve/ray_app.py`, deployed from this process on a local
  Ray cluster of `--threads` CPUs), the same four settings, and once more with routing by load alone
  (`route_by_video=False`): what keying requests by their videos buys.
Every cell uses videos no earlier cell of that server asked about (cold caches), after warm-up requests about other
videos. Each answer is compared with the one-process, unbatched, uncached answer to the same question
(`answers_differ`). For Ray, `sticky` is the share of repeat questions about a video answered by the replica that
answered its first question (from the `x-slowfast-replica` header); `cache hits` come from /metrics (under Ray, the
router's, which sums every replica's; not with Ray's own router).

    python benchmarks/serve.py                       # quick model, 4 videos x 4 questions, 16 tokens
    python benchmarks/serve.py --model default --videos 8 --questions 4 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402
from common import IMAGE_SIZE, MODELS, build_model, command_line, machine, write_results  # noqa: E402
from prefill import slowfast_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (label, max batch size, cache GB)
    "batch_cache": ("batching on, cache on", 8, 4.0),
    "batch_nocache": ("batching on, cache off", 8, 0.0),
    "nobatch_cache": ("batching off, cache on", 1, 4.0),
    "nobatch_nocache": ("batching off, cache off", 1, 0.0),
}
WEIGHT_STD = 0.1  # of the LLM's linear layers (build_model's 0.02 gives every question the same answer)
BASELINE = ("one_process", "nobatch_nocache")  # the answers every other server's are compared with


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_model(size: str, frames: int, folder: Path) -> tuple[Path, Path]:
    """(base folder, adapter folder) of the benchmark model and its slow-fast adapter (4x fewer fast frames)."""
    from slowfast_adapter import wrap

    base, processor = build_model(size)
    with torch.no_grad():  # larger random weights: answers that depend on the video and the question
        generator = torch.Generator().manual_seed(0)
        for module in base.model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, WEIGHT_STD, generator=generator)
    # the random LLM's vocabulary (4,096) is larger than the tiny tokenizer's (384): keep answers to tokens that
    # print as text, or most answers decode to nothing (and no text chunk would ever be streamed)
    tokenizer = processor.tokenizer
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    printable = {i for i, text in texts.items() if text.isprintable() and text.strip() and "\ufffd" not in text}
    base.generation_config.suppress_tokens = [
        i for i in range(base.config.text_config.vocab_size) if i not in printable
    ]
    base.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    model = wrap(base, slowfast_config(4, frames // 4))
    with torch.no_grad():  # open the gates: the slow tokens move the answers
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(1.0)
    model.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def write_videos(folder: Path, names: list[str], frames: int) -> None:
    from slowfast_adapter.tools.tiny import random_video, write_mp4

    folder.mkdir(exist_ok=True)
    for seed, name in enumerate(names):
        write_mp4(folder / f"{name}.mp4", random_video(frames, size=IMAGE_SIZE, seed=1000 + seed))


def request_body(video: str, question: int, tokens: int) -> dict[str, Any]:
    text = f"Question {question}: what happens in this video, and which colours are in it?"
    content = [{"type": "video_url", "video_url": {"url": f"{video}.mp4"}}, {"type": "text", "text": text}]
    return {"model": "adapter", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "stream": True}  # fmt: skip


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streamed request: its latency, time to first token, text and the replica that answered."""
    start = time.perf_counter()
    first, pieces = None, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            text = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if text:
                first = first or time.perf_counter()
                pieces.append(text)
        replica = response.headers.get("x-slowfast-replica")
    end = time.perf_counter()
    return {"latency_s": end - start, "ttft_s": (first or end) - start, "text": "".join(pieces), "replica": replica}


async def run_cell(url: str, videos: list[str], questions: int, clients: int, tokens: int) -> dict[str, Any]:
    """`clients` concurrent clients work through every (question, video) pair, question by question."""
    work = [(video, q) for q in range(questions) for video in videos]
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                video, q = queue.get_nowait()
                results[(video, q)] = {**await one_request(client, url, request_body(video, q, tokens)), "sent": q}

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies = [r["latency_s"] for r in results.values()]
    ttfts = [r["ttft_s"] for r in results.values()]
    return {
        "requests": len(work),
        "wall_s": wall,
        "throughput_rps": len(work) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "sticky": stickiness(results, videos, questions),
        "answers": {f"{video}/{q}": r["text"] for (video, q), r in results.items()},
        "replicas": {f"{video}/{q}": r["replica"] for (video, q), r in results.items()},
    }


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile (linear interpolation between the closest ranks)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stickiness(results: dict, videos: list[str], questions: int) -> float | None:
    """Share of repeat questions about a video answered by the replica that answered its first question."""
    if questions < 2 or any(r["replica"] is None for r in results.values()):
        return None
    same = [results[(v, q)]["replica"] == results[(v, 0)]["replica"] for v in videos for q in range(1, questions)]
    return sum(same) / len(same)


def cache_hits(url: str) -> tuple[int, int]:
    """(hits, misses) of the server's encode caches, from /metrics (under Ray, the router's: every replica's
    samples, labelled by replica, summed)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    sample = r"^slowfast_encode_cache_{}_total(?:\{{[^}}]*\}})? (\d+)"
    hits, misses = (sum(map(int, re.findall(sample.format(name), text, re.M))) for name in ("hits", "misses"))
    return hits, misses


def wait_up(url: str, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def measure_server(url: str, args: argparse.Namespace, sets: dict[int, list[str]], warmup: list[str], *,
                   metrics: bool) -> dict:  # fmt: skip
    """Warm-up requests (other videos, two at a time), then one cell per client count; metrics: read the encode
    caches' hits from /metrics."""
    asyncio.run(run_cell(url, warmup, 1, 2, args.tokens))
    cells = {}
    for clients in args.clients:
        before = cache_hits(url) if metrics else (0, 0)
        cells[clients] = asyncio.run(run_cell(url, sets[clients], args.questions, clients, args.tokens))
        after = cache_hits(url) if metrics else None
        cells[clients]["cache_hits"] = after[0] - before[0] if after else None
        print(f"  {clients:>2} clients: {cells[clients]['throughput_rps']:.2f} req/s", flush=True)
    return cells


def one_process(args: argparse.Namespace, name: str, folders: dict[str, Path], sets, warmup) -> dict:
    """Measure `slowfast-adapter serve` (one process) with one of `SETTINGS`."""
    _, batch, cache_gb = SETTINGS[name]
    port = free_port()
    command = [sys.executable, "-m", "slowfast_adapter.cli", "serve", "--base", str(folders["base"]), "--adapter",
               f"adapter={folders['adapter']}", "--media-root", str(folders["videos"]), "--num-frames",
               str(args.frames), "--port", str(port), "--max-batch-size", str(batch),
               "--cache-gb", str(cache_gb)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    log = open(folders["root"] / f"one_process_{name}.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, process)
        return measure_server(url, args, sets, warmup, metrics=True)
    finally:
        process.send_signal(2)  # Ctrl-C: uvicorn shuts down
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def ray_servers(args: argparse.Namespace, folders: dict[str, Path], sets, warmup) -> dict[str, dict]:
    """Measure Ray Serve (2 replicas) with each of `SETTINGS`, and without routing by video."""
    import ray
    from ray import serve

    from slowfast_adapter.inference.engine import EngineSettings
    from slowfast_adapter.serve import ray_app

    port = free_port()
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runs = [(name, name, True) for name in SETTINGS] + [("batch_cache_no_routing", "batch_cache", False)]
        for label, name, routed in runs:
            _, batch, cache_gb = SETTINGS[name]
            settings = EngineSettings(num_frames=args.frames, max_batch_size=batch, cache_bytes=int(cache_gb * 2**30))
            load = {"base": str(folders["base"]), "adapters": {"adapter": folders["adapter"]},
                    "media_roots": (str(folders["videos"]),), "settings": settings}  # fmt: skip
            app = ray_app.build(load, replicas=args.replicas, cpus_per_replica=args.threads / args.replicas,
                                route_by_video=routed)  # fmt: skip
            print(f"ray {label}", flush=True)
            serve.run(app, name=ray_app.APP_NAME, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_up(url)
            ray_app.wait_for_routing(url, args.replicas, routed)  # the router knows every replica
            results[label] = measure_server(url, args, sets, warmup, metrics=routed)  # Ray's own router: one replica
            serve.delete(ray_app.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="quick")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default 16; 4x fewer fast frames)")
    parser.add_argument("--videos", type=int, default=4, help="videos per cell (default 4)")
    parser.add_argument("--questions", type=int, default=4, help="questions per video (default 4)")
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens (default 16)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per cell")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs: one process's torch threads, "
                        "the Ray cluster's CPUs (split over the replicas)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true", help="only the one-process server")
    parser.add_argument("--name", default="serve", help="results/<name>.json and .md (default serve)")
    args = parser.parse_args()
    start = machine()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        base, adapter = save_model(args.model, args.frames, root)
        folders = {"root": root, "base": base, "adapter": adapter, "videos": root / "videos"}
        sets = {c: [f"c{c}_v{i}" for i in range(args.videos)] for c in args.clients}
        warmup = [f"warmup{i}" for i in range(4)]
        write_videos(folders["videos"], [*warmup, *(v for names in sets.values() for v in names)], args.frames)
        servers: dict[str, dict[str, dict]] = {"one_process": {}}
        for name in SETTINGS:
            print(f"one process {name}", flush=True)
            servers["one_process"][name] = one_process(args, name, folders, sets, warmup)
        if not args.skip_ray:
            servers["ray"] = ray_servers(args, folders, sets, warmup)
    end = machine()
    report(args, servers, start, end)


def report(args: argparse.Namespace, servers: dict, start: dict, end: dict) -> None:
    baseline = servers[BASELINE[0]][BASELINE[1]]
    for cells in (cells for server in servers.values() for cells in server.values()):
        for clients, cell in cells.items():
            reference = baseline[clients]["answers"]
            cell["answers_differ"] = sum(cell["answers"][key] != text for key, text in reference.items())
    labels = {**{name: label for name, (label, _, _) in SETTINGS.items()},
              "batch_cache_no_routing": "batching on, cache on, routed by load alone"}  # fmt: skip
    servers_label = {"one_process": "one process", "ray": f"Ray Serve, {args.replicas} replicas"}
    reference = servers["one_process"]["nobatch_nocache"]
    lines = [
        f"# Serving: one process vs Ray Serve ({args.replicas} replicas), concurrent clients (CPU)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Model: random LLaVA-OneVision layout, Qwen2-style decoder {MODELS[args.model]}, fp32 (LLM linear weights "
        f"std {WEIGHT_STD}, answers kept to the tokenizer's printable tokens), wrapped with its slow-fast adapter "
        f"(gates opened; {args.frames} frames per video, {args.frames // 4} fast frames, 196 tokens "
        f"per frame). Each cell: {args.videos} new videos x {args.questions} questions = "
        f"{args.videos * args.questions} streamed greedy requests of {args.tokens} tokens, sent by N concurrent "
        "clients question by question. One process: `slowfast-adapter serve` with "
        f"{args.threads} torch threads; Ray Serve: {args.replicas} replicas of {args.threads / args.replicas:g} CPU "
        "each, a router that keys requests by their videos. Latency: request sent -> last chunk; TTFT: request sent "
        "-> first text chunk.",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']}; load average "
        f"{start['load_average_1_5_15'][0]:.2f} / {start['load_average_1_5_15'][1]:.2f} (1 / 5 min) at the start, "
        f"{end['load_average_1_5_15'][0]:.2f} at the end.",
        "",
        "| server | setting | clients | req/s | x one process, no batching, no cache | latency p50 / p95 (ms) | "
        "TTFT p50 / p95 (ms) | cache hits | sticky | answers differ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, cells_by_setting in servers.items():
        for name, cells in cells_by_setting.items():
            for clients, cell in cells.items():
                hits = cell["cache_hits"]
                lines.append(
                    f"| {servers_label[server]} | {labels[name]} | {clients} | {cell['throughput_rps']:.2f} | "
                    f"{cell['throughput_rps'] / reference[clients]['throughput_rps']:.2f} | "
                    f"{ms(cell['latency_p50_s'])} / {ms(cell['latency_p95_s'])} | {ms(cell['ttft_p50_s'])} / "
                    f"{ms(cell['ttft_p95_s'])} | {'-' if hits is None else hits} | {fmt(cell['sticky'])} | "
                    f"{cell['answers_differ']} |"
                )
    lines += [
        "",
        "cache hits: requests whose videos were already encoded (from /metrics; under Ray the router sums its "
        "replicas' counters, except with Ray's own router, which cannot reach each replica). sticky: share of repeat "
        "questions about a video answered by the replica that answered its "
        "first one. answers differ: answers not equal to the one-process, unbatched, uncached answer.",
    ]
    data = {
        "command": command_line(),
        "machine_start": start,
        "machine_end": end,
        "model": MODELS[args.model],
        "settings": vars(args),
        "results": {
            s: {n: {str(c): cell for c, cell in cells.items()} for n, cells in by.items()} for s, by in servers.items()
        },  # fmt: skip
    }
    write_results(args.name, data, "\n".join(lines))


if __name__ == "__main__":
    main()
