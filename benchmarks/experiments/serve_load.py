"""A bounded load test of the serving app: the real Ray Serve deployment, concurrent HTTP clients.

    python benchmarks/experiments/serve_load.py                       # tiny random release, defaults
    python benchmarks/experiments/serve_load.py --release artifacts/export --concurrency 1,4,8
    python benchmarks/experiments/serve_load.py --requests 24 --concurrency 1,4 --out load.json

It starts Ray and the Serve app on a release directory (`tasks.release.serving.start_serving`; without
--release, a tiny random 2-tier family is built with the tests' `tiny_export` helper), then, for each
concurrency level, that many client threads (stdlib urllib) send a fixed number of `POST /v1/completions`
requests round-robin over the tiers (`exit_<d>`, `dynamic`, `speculative`), greedy, --max-tokens new
tokens each. Every --invalid-every-th request is a deliberately invalid one (unknown model, max_tokens
above the server's limit, a string for max_tokens) whose 4xx status is known in advance.

Levels are interleaved: each of --rounds rounds runs every level once with requests/rounds requests, so
a busy phase of a shared machine hits every level alike. Printed (and written to --out) as JSON: per
level, the requests, errors by kind (an HTTP status other than the expected one, `timeout`,
`connection`), client-side latency p50 / p95 / max, throughput (requests/s and new tokens/s), the
server-side `processing_ms` p50 (time inside the replica's handler: waiting for the decode lock, then
decoding; the rest of the latency is HTTP and Ray's proxy), and the same figures per tier. Nothing is
retried. Progress and Ray's messages go to stderr; stdout is the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "Sara had 12 pencils. She gave 5 to her friend.",
    "The quick brown fox",
]


def percentile(values: list[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _invalid_requests(tier: str, max_tokens_limit: int) -> list[tuple[dict, int]]:
    """Invalid requests and the status each must get."""
    return [
        ({"model": "no-such-tier", "prompt": PROMPTS[0], "max_tokens": 2}, 404),
        ({"model": tier, "prompt": PROMPTS[0], "max_tokens": max_tokens_limit + 1}, 400),
        ({"model": tier, "prompt": PROMPTS[0], "max_tokens": "lots"}, 422),
    ]


def plan_requests(
    tiers: list[str], n: int, max_tokens: int, invalid_every: int, max_tokens_limit: int, offset: int = 0
) -> list[dict]:
    """`n` request specs: {"tier", "body", "expect"}; valid ones round-robin over `tiers` and PROMPTS."""
    specs = []
    for i in range(offset, offset + n):
        tier = tiers[i % len(tiers)]
        if invalid_every and i % invalid_every == invalid_every - 1:
            body, expect = _invalid_requests(tier, max_tokens_limit)[(i // invalid_every) % 3]
            specs.append({"tier": "invalid", "body": body, "expect": expect})
        else:
            body = {"model": tier, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
            specs.append({"tier": tier, "body": body, "expect": 200})
    return specs


def send(url: str, body: dict, timeout_s: float) -> tuple[int | str, dict | None, float]:
    """POSTs `body`; returns (status or "timeout"/"connection", parsed body or None, seconds)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except TimeoutError:
        return "timeout", None, time.perf_counter() - t0
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        kind = "timeout" if isinstance(reason, TimeoutError) else "connection"
        return kind, None, time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    try:
        return status, json.loads(raw), elapsed
    except ValueError:
        return status, None, elapsed


def run_level(url: str, specs: list[dict], concurrency: int, timeout_s: float) -> tuple[list[dict], float]:
    """Sends `specs` from `concurrency` threads; returns (one record per request, wall seconds)."""
    work: queue.Queue = queue.Queue()
    for spec in specs:
        work.put(spec)
    records: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                spec = work.get_nowait()
            except queue.Empty:
                return
            status, body, seconds = send(f"{url}/v1/completions", spec["body"], timeout_s)
            record = {"tier": spec["tier"], "status": status, "expect": spec["expect"], "seconds": seconds}
            if status == 200 and isinstance(body, dict):
                record["completion_tokens"] = body.get("usage", {}).get("completion_tokens", 0)
                record["processing_ms"] = body.get("ruyi", {}).get("processing_ms")
            elif isinstance(body, dict) and isinstance(body.get("error"), dict):
                record["param"] = body["error"].get("param")
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def summarize(records: list[dict], wall_s: float) -> dict:
    """Counts, errors by kind, latency percentiles (ms) and throughput of a set of request records."""
    errors: dict[str, int] = {}
    for r in records:
        if r["status"] != r["expect"]:
            key = str(r["status"])
            errors[key] = errors.get(key, 0) + 1
    valid = [r for r in records if r["expect"] == 200]
    ok = [r for r in valid if r["status"] == 200]
    latencies = [1000.0 * r["seconds"] for r in valid]
    processing = [r["processing_ms"] for r in ok if r.get("processing_ms") is not None]
    tokens = sum(r.get("completion_tokens", 0) for r in ok)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    out = {
        "requests": len(records),
        "valid": len(valid),
        "ok": len(ok),
        "invalid_sent": len(records) - len(valid),
        "invalid_answered_as_expected": sum(
            1 for r in records if r["expect"] != 200 and r["status"] == r["expect"]
        ),
        "server_errors_5xx": sum(1 for r in records if isinstance(r["status"], int) and r["status"] >= 500),
        "errors": dict(sorted(errors.items())),
        "latency_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p95": ms(percentile(latencies, 95)),
            "max": ms(max(latencies) if latencies else None),
        },
        "processing_ms_p50": ms(percentile(processing, 50)),
        "completion_tokens": tokens,
    }
    if wall_s > 0:
        out["wall_s"] = round(wall_s, 2)
        out["requests_per_s"] = round(len(records) / wall_s, 2)
        out["tokens_per_s"] = round(tokens / wall_s, 1)
    return out


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"--concurrency: integers >= 1, got {text!r}")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Bounded load test of the Ray Serve app: concurrent clients, p50/p95 latency per tier.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--release", help="release or export directory (exit_<d>/, family/); default: tiny random")
    p.add_argument("--concurrency", type=_levels, default=[1, 8], help="client threads, one level each")
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (requests are split over them)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per valid request")
    p.add_argument("--max-tokens-limit", type=int, default=64, help="the server's deploy.max_tokens_limit")
    p.add_argument("--invalid-every", type=int, default=10, help="every k-th request is invalid (0: none)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per tier first")
    p.add_argument("--timeout-s", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="logical CPUs of the Serve replica")
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    for name in ("requests", "rounds", "max_tokens", "max_tokens_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.requests < args.rounds:
        p.error("--requests must be at least --rounds")
    if args.max_tokens > args.max_tokens_limit:
        p.error("--max-tokens must not exceed --max-tokens-limit")
    if args.invalid_every < 0 or args.warmup < 0 or args.timeout_s <= 0:
        p.error("--invalid-every and --warmup must be >= 0, --timeout-s > 0")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, release_dir: Path) -> dict:
    from tasks.release.serving import http_json, start_serving

    port = args.port or _free_port()
    t0 = time.perf_counter()
    with start_serving(
        release_dir,
        port=port,
        model_name="tiny" if not args.release else None,
        max_tokens_limit=args.max_tokens_limit,
        replica_num_cpus=args.replica_cpus,
    ) as session:
        startup_s = time.perf_counter() - t0
        _, health = http_json(f"{session.url}/healthz")
        tiers = list(health["tiers"])
        for tier in tiers:  # the first request of a tier pays one-off costs
            for i in range(args.warmup):
                body = {"model": tier, "prompt": PROMPTS[i % len(PROMPTS)]}
                send(f"{session.url}/v1/completions", body, args.timeout_s)
        load_before = os.getloadavg()
        records: dict[int, list[dict]] = {c: [] for c in args.concurrency}
        wall: dict[int, float] = dict.fromkeys(args.concurrency, 0.0)
        base, extra = divmod(args.requests, args.rounds)
        per_round = [base + (r < extra) for r in range(args.rounds)]
        for r, n in enumerate(per_round):
            for c in args.concurrency:
                specs = plan_requests(
                    tiers, n, args.max_tokens, args.invalid_every, args.max_tokens_limit, sum(per_round[:r])
                )
                got, seconds = run_level(session.url, specs, c, args.timeout_s)
                records[c] += got
                wall[c] += seconds
        load_after = os.getloadavg()
    levels = {}
    for c in args.concurrency:
        level = summarize(records[c], wall[c])
        level["per_tier"] = {
            tier: summarize([r for r in records[c] if r["tier"] == tier], 0.0)
            for tier in [*tiers, "invalid"]
            if any(r["tier"] == tier for r in records[c])
        }
        levels[str(c)] = level
    return {
        "release": health.get("release"),
        "tiers": tiers,
        "settings": {
            "requests_per_level": args.requests,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "max_tokens_limit": args.max_tokens_limit,
            "invalid_every": args.invalid_every,
            "timeout_s": args.timeout_s,
            "replica_cpus": args.replica_cpus,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(load_after[0], 2),
        },
        "startup_s": round(startup_s, 1),
        "concurrency": levels,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="ruyi-load-") as tmp:
        if args.release:
            release_dir = Path(args.release)
            if not release_dir.is_dir():
                print(f"serve_load: release directory not found: {release_dir}", file=sys.stderr)
                return 2
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_export import build_tiny_export

            with contextlib.redirect_stdout(sys.stderr):
                release_dir = build_tiny_export(Path(tmp) / "tiny")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON result alone
            result = run(args, release_dir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
