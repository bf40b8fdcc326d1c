"""Merge benchmark: evomerge against mergekit on a ~270M-parameter Llama, and the trial loop.

    .venv/bin/python benchmarks/bench_merge.py                  # full run (mergekit ties takes ~100 s)
    .venv/bin/python benchmarks/bench_merge.py --skip-mergekit  # reuse mergekit figures from bench.json
    .venv/bin/python benchmarks/bench_merge.py --quick          # small model, smoke run

Models (a base and three noisy variants, bf16 safetensors) are built once into ``--models``
and reused. Every measured command runs in a fresh process; its peak RSS comes from
``os.wait4`` (that child's own ru_maxrss). Merges to disk run ``--repeat`` rounds, the tools
interleaved; a row shows the best wall time and the largest peak RSS. Bars checked:

- mergekit wall / evomerge wall, for ties and linear: >= 10x
- in-memory trial merge / memory-bandwidth floor: <= 5x (floor = bytes the trial must read and
  write / copy bandwidth; it reads cached task vectors of the sources and the base, writes the params)
- evomerge peak RSS above the interpreter's baseline (torch + evomerge imported) / output size: <= 2x

Also printed, not a bar: the start-up of a fresh interpreter that imports torch, which every
torch-based tool pays, and so the most any of them can be ahead of mergekit (mergekit / start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
N_SOURCES = 3
GB = 1e9

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000)  # ~271M parameters, untied embeddings
QUICK = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=8000)


# --- building the models (once) --------------------------------------------------------------


def build_models(folder: Path, shape: dict) -> None:
    """A base and N_SOURCES variants (base + seeded noise), built in bf16 to keep RAM low."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(folder / "base")
    with torch.no_grad():
        for i in range(N_SOURCES):
            g = torch.Generator().manual_seed(1000 + i)
            for name, p in model.state_dict().items():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.01
                p.copy_(base[name].float() + noise * base[name].float().abs().mean())
            model.save_pretrained(folder / f"m{i}")
    n = sum(p.numel() for p in base.values())
    (folder / "params.json").write_text(json.dumps({"params": n, "shape": shape}))


def ensure_models(folder: Path, shape: dict) -> dict:
    info = folder / "params.json"
    if info.exists() and json.loads(info.read_text())["shape"] == shape:
        return json.loads(info.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"building models into {folder} (once)...", flush=True)
    run_child(["build", str(folder), json.dumps(shape)])
    return json.loads(info.read_text())


def write_configs(models: Path, out: Path) -> dict[str, Path]:
    """mergekit YAML for ties and linear; evomerge reads the same files."""
    import yaml

    weights = [0.3, 0.3, 0.4]
    ties = {"merge_method": "ties", "base_model": str(models / "base"), "dtype": "bfloat16",
            "parameters": {"normalize": True},
            "models": [{"model": str(models / f"m{i}"), "parameters": {"weight": w, "density": 0.5}}
                       for i, w in enumerate(weights)]}
    linear = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(models / f"m{i}"), "parameters": {"weight": w}}
                         for i, w in enumerate(weights)]}
    paths = {}
    for name, cfg in (("ties", ties), ("linear", linear)):
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


# --- measuring in fresh processes ------------------------------------------------------------


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (GB) of one command in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / GB, "output": output}


def run_child(args: list[str]) -> dict:
    """This script in a child process; its last line of output is a JSON result."""
    result = measure([sys.executable, __file__, "--child", *args])
    lines = result["output"].strip().splitlines()
    child = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {**child, "peak_rss_gb": result["peak_rss_gb"]}


def child_baseline() -> dict:
    import resource

    import torch  # noqa: F401

    import evomerge.pipelines.merge  # noqa: F401

    return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


def child_trial(cfg: str, reps: int) -> dict:
    """open_session + merge_into a resident model: first call (reads and caches), then reps."""
    import torch

    from evomerge.pipelines.merge import open_session
    from evomerge.recipe import load_recipe

    session = open_session(load_recipe(Path(cfg)), device="cpu")
    engine = session.engine
    model = session.adapter.build(engine.reference, engine.dtype, "cpu")
    params = session.adapter.parameters(model)
    table = session.table()
    start = time.perf_counter()
    engine.merge_into(params, table)
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.merge_into(params, table)
        times.append(time.perf_counter() - start)
    merged = [j for j in engine.jobs if j.merge]
    numel = sum(params[j.name].numel() for j in merged)
    size = torch.empty((), dtype=engine.dtype).element_size()
    # reads: cached task vectors of every source plus the base; writes: the parameters
    traffic = numel * size * (len(session.sources) + 1 + 1)
    return {"first_s": first, "best_s": min(times), "times": times, "traffic_bytes": traffic}


def child_bandwidth(size_gb: float) -> dict:
    """Copy bandwidth, counted as bytes read + written per second, best of several copies."""
    import torch

    n = int(size_gb * GB)
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return {"bytes_per_s": 2 * n / best}


def child_main(args: list[str]) -> None:
    kind = args[0]
    if kind == "build":
        build_models(Path(args[1]), json.loads(args[2]))
        result = {}
    elif kind == "baseline":
        result = child_baseline()
    elif kind == "trial":
        result = child_trial(args[1], int(args[2]))
    elif kind == "startup":
        import torch  # noqa: F401
        result = {}
    elif kind == "bandwidth":
        result = child_bandwidth(float(args[1]))
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps(result))


# --- the run ---------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--models", type=Path, default=None, help="model cache (default OUT/models)")
    ap.add_argument("--skip-mergekit", action="store_true", help="reuse mergekit figures from OUT/bench.json")
    ap.add_argument("--quick", action="store_true", help="small model: a smoke run")
    ap.add_argument("--reps", type=int, default=3, help="timed trial merges after the first")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the merges to disk (best wall counts)")
    ns = ap.parse_args()

    out: Path = ns.out
    out.mkdir(parents=True, exist_ok=True)
    models = ns.models or out / ("models-quick" if ns.quick else "models")
    info = ensure_models(models, QUICK if ns.quick else FULL)
    cfgs = write_configs(models, out)
    json_path = out / ("bench-quick.json" if ns.quick else "bench.json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}

    rows: dict[str, dict] = {}
    baseline = run_child(["baseline"])["rss_gb"]
    runs: dict[str, list[dict]] = {}  # row -> one result per round
    for _ in range(ns.repeat):  # rounds interleave the tools, so a noisy spell hits them alike
        start = time.perf_counter()
        run_child(["startup"])
        runs.setdefault("start-up (python, import torch)", []).append({"wall_s": time.perf_counter() - start})
        for method, cfg in cfgs.items():
            target = out / f"evomerge-{method}"
            shutil.rmtree(target, ignore_errors=True)  # as for mergekit: no old output to remove
            r = measure([str(BIN / "evomerge"), "merge", str(cfg), "--out", str(target), "--force",
                         "--device", "cpu"])
            runs.setdefault(f"evomerge {method}", []).append({**r, "output_gb": folder_bytes(target) / GB})
            if not ns.skip_mergekit:
                target = out / f"mergekit-{method}"
                shutil.rmtree(target, ignore_errors=True)
                r = measure([str(BIN / "mergekit-yaml"), str(cfg), str(target), "--no-copy-tokenizer"])
                runs.setdefault(f"mergekit {method}", []).append(r)
    for name, results in runs.items():  # best wall of the rounds; the largest peak RSS
        rows[name] = {"wall_s": min(r["wall_s"] for r in results),
                      "walls_s": [round(r["wall_s"], 3) for r in results]}
        if "peak_rss_gb" in results[0]:
            rows[name]["peak_rss_gb"] = max(r["peak_rss_gb"] for r in results)
        if "output_gb" in results[0]:
            rows[name]["output_gb"] = results[0]["output_gb"]
    for method in cfgs:
        key = f"mergekit {method}"
        if ns.skip_mergekit and key in previous.get("rows", {}):
            rows[key] = {**previous["rows"][key], "reused": True}

    trial = run_child(["trial", str(cfgs["ties"]), str(ns.reps)])
    bandwidth = run_child(["bandwidth", "0.1" if ns.quick else "1.0"])["bytes_per_s"]
    floor = trial["traffic_bytes"] / bandwidth
    rows["trial ties (first, caching)"] = {"wall_s": trial["first_s"], "peak_rss_gb": trial["peak_rss_gb"]}
    rows["trial ties (best of reps)"] = {"wall_s": trial["best_s"]}
    rows["trial floor (bandwidth)"] = {"wall_s": floor}

    ratios = {}
    for method in cfgs:
        mk, ev = rows.get(f"mergekit {method}"), rows[f"evomerge {method}"]
        if mk:
            ratios[f"mergekit/evomerge {method} (>= 10)"] = mk["wall_s"] / ev["wall_s"]
        ratios[f"evomerge {method} RSS above baseline / output (<= 2)"] = (
            (ev["peak_rss_gb"] - baseline) / ev["output_gb"])
    ratios["trial/floor (<= 5)"] = trial["best_s"] / floor
    # not bars: torch's start-up alone caps how far ahead of mergekit any torch-based tool can be
    startup = rows["start-up (python, import torch)"]["wall_s"]
    notes = {f"mergekit {method} / start-up (the most a torch tool can reach)":
             rows[f"mergekit {method}"]["wall_s"] / startup for method in cfgs if f"mergekit {method}" in rows}
    report = {"params": info["params"], "baseline_rss_gb": baseline, "copy_bandwidth_gb_s": bandwidth / GB,
              "trial_traffic_gb": trial["traffic_bytes"] / GB, "trial_times_s": trial["times"],
              "rows": rows, "ratios": ratios, "notes": notes}
    json_path.write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\nmodel: {report['params'] / 1e6:.0f}M params, 3 sources; baseline RSS "
          f"{report['baseline_rss_gb']:.2f} GB; copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s "
          f"(read+write); trial traffic {report['trial_traffic_gb']:.2f} GB")
    print(f"{'':34} {'wall s':>9} {'peak RSS GB':>12}")
    for name, row in report["rows"].items():
        rss = f"{row['peak_rss_gb']:.2f}" if "peak_rss_gb" in row else ""
        note = "  (reused)" if row.get("reused") else ""
        if len(row.get("walls_s", [])) > 1:
            note += "  rounds: " + " ".join(f"{w:.2f}" for w in row["walls_s"])
        print(f"{name:34} {row['wall_s']:9.3f} {rss:>12}{note}")
    print()
    for name, value in report["ratios"].items():
        bar = float(name.split()[-1].rstrip(")"))
        ok = value >= bar if ">=" in name else value <= bar
        print(f"{name:50} {value:8.2f}  {'ok' if ok else 'MISS'}")
    for name, value in report.get("notes", {}).items():
        print(f"{name:50} {value:8.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
