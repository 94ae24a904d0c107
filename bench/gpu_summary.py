"""Collects a ``bench/gpu_check.sh`` log folder into one ``summary.json`` and prints what a reader needs first.

summary.json holds: the steps (verdict, seconds); build_info; tests (passed, failed, errors, skipped and the failing
ids, read from the JUnit XML, which pytest writes even when ``timeout -s INT`` stopped it); the memcheck verdict;
the steered_linear, split_loss and host-overhead figures with each goal of issues #22–#24 checked; and the routes
those figures support (``fastsplit/ops/_routing.py``: the fastest backend per form × m kind × row class among the
ones that passed the tests and memcheck).

    python bench/gpu_summary.py gpu-check/
"""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tests(folder) -> dict | None:
    """Counts and failing ids from the JUnit XML."""
    path = os.path.join(folder, "tests.xml")
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"tests.xml does not parse: {exc}"}
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            out["failed"] += 1
            out["failing"].append(test_id)
        elif "error" in kinds:
            out["errors"] += 1
            out["failing"].append(test_id)
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def memcheck(folder) -> dict:
    path = os.path.join(folder, "memcheck.log")
    if not os.path.exists(path):
        return {"verdict": "not run"}
    text = open(path, errors="replace").read()
    found = re.search(r"ERROR SUMMARY: (\d+) error", text)
    ran = re.search(r"sanitize_cases: (\d+) cases ran", text)
    where = [line for line in text.splitlines() if re.match(r"\[\s*[\d.]+s\]", line)]
    if found:
        verdict = "clean" if int(found.group(1)) == 0 and ran else f"{found.group(1)} errors"
    else:
        verdict = "dry run: no sanitizer" if ran else "did not finish"
    return {"verdict": verdict, "cases": int(ran.group(1)) if ran else None, "last_progress": where[-1:] or None}


def steps(folder) -> list[dict]:
    path = os.path.join(folder, "steps.txt")
    out = []
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        m = re.match(r"(\S+)\s+(ok|FAILED|TIMED OUT)\s+rc=(\d+)\s+(\d+)s", line)
        if m:
            out.append({"step": m.group(1), "verdict": m.group(2), "rc": int(m.group(3)), "seconds": int(m.group(4))})
    return out


# The goals of issue #23, as ratios to bare F.linear at prefill (auto must also never be above eager).
PREFILL_GOALS = {("vector", "scalar"): 1.02, ("vector", "per_row"): 1.10, ("lora", "scalar"): 1.15,
                 ("lora", "per_row"): 1.15, ("local_weight", "scalar"): 1.15, ("local_weight", "per_row"): 2.10}


def steered(fig) -> dict | None:
    if not fig:
        return None
    rows = []
    for case in fig["cases"]:
        ms = {p: v for p, v in case["ms"].items() if isinstance(v, (int, float))}
        row = {k: case[k] for k in ("form", "mkind", "shape", "kind")}
        if "gemm" in ms:
            row["x_gemm"] = {p: round(v / ms["gemm"], 3) for p, v in ms.items() if p != "gemm"}
        if "eager" in ms:
            row["x_eager"] = {p: round(v / ms["eager"], 3) for p, v in ms.items() if p not in ("eager", "gemm")}
        row["failed"] = {p: v for p, v in case["ms"].items() if isinstance(v, str)}
        if case["kind"] == "prefill" and "auto" in ms:
            goal = PREFILL_GOALS[(case["form"], case["mkind"])]
            row["goal"] = {"x_gemm_max": goal, "met": ms["auto"] / ms["gemm"] <= goal and ms["auto"] <= ms.get(
                "eager", float("inf"))}
        if case.get("bw_share"):
            row["bw_share"] = {p: round(v, 3) for p, v in case["bw_share"].items()}
            best = max(v for p, v in case["bw_share"].items() if p in ("auto", "torch", "triton"))
            row["goal"] = {"bw_share_min": 0.8, "met": best >= 0.8}
        rows.append(row)
    return {"device": fig["device"], "copy_bandwidth_TBps": fig.get("copy_bandwidth_TBps"), "cases": rows}


def split(fig) -> dict | None:
    if not fig:
        return None
    rows = []
    for case in fig["cases"]:
        p = {k: v for k, v in case["providers"].items() if "ms" in v}
        row = {"shape": case["shape"], "V": case["V"], "providers": case["providers"]}
        if "fastsplit" in p and "naive" in p:
            fs = p["fastsplit"]
            peers = [p[k]["ms"] for k in ("liger", "cce") if k in p]
            best_peer = min(peers) if peers else None
            row["goal"] = {"x_full_logits": round(fs["ms"] / p["naive"]["ms"], 3),
                           "extra_mib": round(fs["extra_mib"], 1),
                           "speedup_vs_best_peer": round(best_peer / fs["ms"], 3) if best_peer else None}
            row["goal"]["met"] = (fs["ms"] <= 1.15 * p["naive"]["ms"] and fs["extra_mib"] <= 256
                                  and (best_peer is None or best_peer / fs["ms"] >= 1.3))
        rows.append(row)
    return {"device": fig["device"], "skipped_peers": fig.get("skipped", []), "cases": rows}


def routes(fig, green: set) -> dict:
    """The fastest green backend per (form, m kind, row class), from the steered figures (device time for decode)."""
    out = {}
    for case in (fig or {}).get("cases", []):
        times = case["graph_ms"] if case["kind"] == "decode" and case.get("graph_ms") else case["ms"]
        times = {p: v for p, v in times.items() if p in green and isinstance(v, (int, float))}
        if times:
            key = f"steered_linear|{case['form']}|{case['mkind']}|{case['kind']}"
            best = min(times, key=times.get)
            if key not in out or times[best] < out[key][1]:
                out[key] = (best, times[best])
    return {k: v[0] for k, v in out.items()}


def targets(doc) -> dict | None:
    """fastsplit.kernels.check_targets' table, summed up: compiles, failures and what each failure is."""
    if doc is None:
        return None
    bad = [f"{r['kernel'].split(':')[1]} {r['target']} {r['config']}: {'; '.join(r['problems'])}"
           for r in doc["rows"] if r["problems"]]
    bad += [f"{r['kernel']} {r['target']}: {'; '.join(r['problems'])}" for r in doc.get("cuda", {}).get("rows", [])
            if r["problems"]]
    return {"entries": doc["entries"], "targets": doc["targets"], "seconds": doc["seconds"], "failing": bad}


def main(folder: str) -> int:
    t = tests(folder)
    mc = memcheck(folder)
    lin = _load(folder, "steered_linear.json")
    green = {"torch"}
    if t and not t.get("failing") and not t.get("error") and mc["verdict"] == "clean":
        green.add("triton")
    summary = {"steps": steps(folder), "build_info": _load(folder, "build_info.json"), "tests": t, "memcheck": mc,
               "steered_linear": steered(lin), "split_loss": split(_load(folder, "split_loss.json")),
               "overhead": _load(folder, "overhead.json"), "routes_supported": routes(lin, green),
               "tuned": _load(folder, "tune.json"), "targets": targets(_load(folder, "targets.json")),
               "green_backends": sorted(green)}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    total = sum(s["seconds"] for s in summary["steps"])
    done = ", ".join(f"{s['step']} {s['verdict']} {s['seconds']}s" for s in summary["steps"])
    print(f"steps: {done} ({total} s)")
    if t is None:
        print("tests: no JUnit XML (the tests step did not start)")
    elif "error" in t:
        print(f"tests: {t['error']}")
    else:
        print(f"tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for test_id in t["failing"]:
            print(f"  FAILED {test_id}")
    print(f"memcheck: {mc['verdict']}" + (f" ({mc['cases']} cases)" if mc.get("cases") else "")
          + (f"; last progress: {mc['last_progress'][0]}" if mc.get("last_progress") and mc["verdict"] != "clean"
             else ""))
    for name in ("steered_linear", "split_loss"):
        block = summary[name]
        if block:
            goals = [c["goal"]["met"] for c in block["cases"] if "goal" in c]
            print(f"{name}: {sum(goals)} of {len(goals)} goals met on {block['device']}")
    print(f"routes the figures support (green: {', '.join(sorted(green))}): {summary['routes_supported']}")
    tuned = (summary["tuned"] or {}).get("results", [])
    if tuned:
        refused = sum(len(r.get("refused", {})) for r in tuned)
        print(f"tuned routes ({len(tuned)} keys, {refused} candidates refused): "
              + ", ".join(f"{r['op']}|{r['form']}|{r['mkind']}|{r['rows']}: {r['choice']}" for r in tuned))
    print(f"wrote {os.path.join(folder, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check"))
