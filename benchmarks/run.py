"""`make bench`: run every benchmark module side by side and write results.json + results.md.

Each module ``benchmarks/bench_*.py`` exposes ``TITLE: str`` and
``run(device: str = "cpu", full: bool = False) -> dict`` returning::

    {"rows": [{"name": str, "value": float, "unit": str}, ...],
     "ratios": [{"name": str, "value": float, "target": float}, ...],
     "notes": str}

Ratios are always measured within one run (baseline and candidate side by side).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
log = logging.getLogger("benchmarks")


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def render_markdown(results: dict) -> str:
    lines = ["# Benchmark results", "", f"- when: {results['when']}", f"- device: {results['device']}",
             f"- machine: {results['machine']}", ""]
    for name, res in results["benchmarks"].items():
        lines += [f"## {res.get('title', name)}", ""]
        if "error" in res:
            lines += [f"FAILED: {res['error']}", ""]
            continue
        if res.get("ratios"):
            lines += ["| ratio | value | target | met |", "| --- | ---: | ---: | :-: |"]
            for r in res["ratios"]:
                met = "yes" if r["value"] >= r["target"] else "no"
                lines.append(f"| {r['name']} | {r['value']:.2f} | {r['target']:.2f} | {met} |")
            lines.append("")
        if res.get("rows"):
            lines += ["| measure | value | unit |", "| --- | ---: | --- |"]
            for r in res["rows"]:
                lines.append(f"| {r['name']} | {r['value']:.4g} | {r['unit']} |")
            lines.append("")
        if res.get("notes"):
            lines += [res["notes"], ""]
    for name in ("concept_sweep.md", "additivity.md"):  # measurements of their own (minutes per run)
        if (HERE / name).is_file():
            text = (HERE / name).read_text().lstrip("# ")  # its title and sections one level down
            lines += ["## " + text.replace("\n## ", "\n### "), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the performance harness and write results.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="paper-size workloads (GPU)")
    ap.add_argument("--only", nargs="*", help="bench module names (e.g. bench_train)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.json/.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.only or discover()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "device": f"{args.device} ({device_name})",
               "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
               "benchmarks": {}}
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        log.info("running %s ...", name)
        t0 = time.perf_counter()
        try:
            res = mod.run(device=args.device, full=args.full)
        except Exception as exc:  # a failing benchmark must not hide the others
            log.exception("%s failed", name)
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res.setdefault("title", getattr(mod, "TITLE", name))
        res["seconds"] = time.perf_counter() - t0
        results["benchmarks"][name] = res
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"results{suffix}.md").write_text(render_markdown(results))
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
