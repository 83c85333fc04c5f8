"""serve.py under load: 8 concurrent streaming clients against the same 8 requests sent one after another.

Starts serve.py on a checkpoint (default: the quickstart's SFT model), then for --rounds rounds, interleaved, sends
the --clients chat requests (held-out built-in questions, streaming, temperature 0.8 with a seed per request,
--max_tokens) sequentially and then all at once. Reported per mode: aggregate generated tokens/s (the server's own
usage counts over the wall time of the whole batch of requests) and the time to first token (mean over requests);
the ratio concurrent / sequential is taken per round and its median printed (goal: >= 4x with 8 clients). On a
shared machine wall-clock throughput swings with the other load; the tokens per CPU second of the server process
(user + system time of all its threads, from /proc) measure the batching gain without that noise.

    python bench/bench_serve.py --save_file_name quickstart_out/sft_checkpoints
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_server(args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "serve.py"), "--save_file_name", args.save_file_name, "--port", "0",
               "--max_batch_size", str(args.clients), "--device", args.device, "--model_name", "bench"]
    if args.cpus:
        command = ["taskset", "-c", args.cpus, *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stdout.read()}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its output
    return proc, f"http://127.0.0.1:{match.group(1)}"


def one_request(url: str, question: str, seed: int, max_tokens: int, out: dict, fixed: bool = True) -> None:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0.8, "seed": seed, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "ignore_eos": fixed}
    t0 = time.perf_counter()
    first = None
    with httpx.Client(timeout=600) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    out["ttft"] = (first or time.perf_counter()) - t0
    out["total"] = time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the server process has used: robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVER_PID = 0


def run_mode(url: str, questions: list[str], max_tokens: int, concurrent: bool, round_index: int,
             fixed: bool) -> dict:
    results = [{} for _ in questions]
    cpu0 = cpu_seconds(SERVER_PID)
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one_request, args=(url, q, 1000 * round_index + i, max_tokens, r, fixed))
                   for i, (q, r) in enumerate(zip(questions, results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, (q, r) in enumerate(zip(questions, results)):
            one_request(url, q, 1000 * round_index + i, max_tokens, r, fixed)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(SERVER_PID) - cpu0
    tokens = sum(r.get("tokens", 0) for r in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "tok_cpu_s": tokens / max(cpu, 1e-9),
            "ttft": statistics.mean(r["ttft"] for r in results)}


def report(url: str, questions: list[str], args, fixed: bool, health: dict) -> None:
    """Interleaved rounds of sequential and concurrent requests for one workload; prints the table."""
    name = (f"fixed length: every reply is {args.max_tokens} tokens (ignore_eos)" if fixed else
            f"natural: replies end at end-of-turn (at most {args.max_tokens} tokens)")
    print(f"\n### workload {name}")
    ratios, cpu_ratios, rows = [], [], []
    for r in range(args.rounds):
        batch = questions[r * args.clients:(r + 1) * args.clients]
        ttft_one = statistics.mean(run_mode(url, batch[:1], args.max_tokens, False, r, fixed)["ttft"]
                                   for _ in range(2))
        seq = run_mode(url, batch, args.max_tokens, False, r, fixed)
        con = run_mode(url, batch, args.max_tokens, True, r, fixed)
        ratios.append(con["tok_s"] / seq["tok_s"])
        cpu_ratios.append(con["tok_cpu_s"] / seq["tok_cpu_s"])
        rows.append((r, seq, con, ttft_one))
        print(f"round {r}: sequential {seq['tok_s']:.1f} tok/s ({seq['tokens']} tokens) | concurrent "
              f"{con['tok_s']:.1f} tok/s ({con['tokens']} tokens, ttft {con['ttft'] * 1e3:.0f} ms) | 1-client ttft "
              f"{ttft_one * 1e3:.0f} ms | ratio {ratios[-1]:.2f}x | tokens per server CPU second {seq['tok_cpu_s']:.0f} "
              f"-> {con['tok_cpu_s']:.0f} ({cpu_ratios[-1]:.2f}x) | load {os.getloadavg()[0]:.1f}")
    after = httpx.get(url + "/health").json()
    print("\n| mode | aggregate tokens/s (median) | tokens per server CPU second | mean time to first token |")
    print("| --- | --- | --- | --- |")
    print(f"| {args.clients} requests one after another | {statistics.median(x[1]['tok_s'] for x in rows):.1f} | "
          f"{statistics.median(x[1]['tok_cpu_s'] for x in rows):.0f} | "
          f"{statistics.median(x[3] for x in rows) * 1e3:.0f} ms (1 client) |")
    print(f"| {args.clients} concurrent streaming clients | {statistics.median(x[2]['tok_s'] for x in rows):.1f} | "
          f"{statistics.median(x[2]['tok_cpu_s'] for x in rows):.0f} | "
          f"{statistics.median(x[2]['ttft'] for x in rows) * 1e3:.0f} ms ({args.clients} clients) |")
    print(f"\nconcurrent / sequential: throughput median {statistics.median(ratios):.2f}x, tokens per server CPU "
          f"second median {statistics.median(cpu_ratios):.2f}x, over {args.rounds} rounds (goal >= 4x) | largest "
          f"batch decoded together: {after['max_batch']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save_file_name", default="quickstart_out/sft_checkpoints")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="fixed,natural",
                        help="fixed: every reply max_tokens long (ignore_eos); natural: replies end at end-of-turn")
    parser.add_argument("--cpus", default="", help="pin the server to these CPUs (taskset -c), e.g. 0,1")
    args = parser.parse_args()
    import chat_data

    questions = [row["messages"][0]["content"] for row in chat_data.builtin_conversations("test")]
    global SERVER_PID
    proc, url = start_server(args)
    SERVER_PID = proc.pid
    try:
        one_request(url, questions[0], 0, 8, {})  # warm-up
        health = httpx.get(url + "/health").json()
        print(f"server {url} on {args.device}{' cpus ' + args.cpus if args.cpus else ''} | {args.clients} clients | "
              f"max_tokens {args.max_tokens} | load {os.getloadavg()}")
        for workload in args.workloads.split(","):
            fixed = workload == "fixed"
            report(url, questions, args, fixed, health)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
