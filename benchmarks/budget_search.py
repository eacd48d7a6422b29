"""Budgeted search on this machine: searched vs random at equal budget (paper Table 3), specialisation (paper
Fig. 5) and a Pareto plot, all judged by latency measured here and accuracy under ``pose.proxy.PROXY``.

Steps (one run, nothing tuned to the networks it reports):

1. One local agent builds the onnxruntime-cpu and torch-cpu LUTs of the small space (1 thread, batch 1,
   256x256: the paper's MPII input). EfficientPose-A's cost under each target (ORT LUT ms, torch LUT ms,
   paper GFLOPs) sets the budgets: ``share x A's cost``.
2. Searches, each with one ``--target`` and the default recipe of ``effpose search`` on the proxy's data:
   ORT at every ``--shares`` value (Pareto), torch-cpu and FLOPs at the middle share (specialisation), and
   the middle ORT search again with ``--task-term log-mse`` (ablation: does a scale-free accuracy term
   let accuracy pick the layers?).
3. Random legal networks whose ORT-LUT prediction is within +-5 % of the middle ORT budget, drawn with a
   random skip density per network (``random_ops_at_density``) and kept in draw order: the first
   ``--random`` that qualify.
4. Every network (searched, random, efficientpose-a, mobilenetv2) trained and scored with the proxy for
   every seed (``pose.proxy.train_and_score``), ``--jobs`` at a time, one torch thread each.
5. Latency of every network measured here, with nothing else running: ONNX Runtime and torch, 1 thread,
   batch 1, all candidates interleaved in shuffled rounds (``common.interleaved_timing``).

    python benchmarks/budget_search.py --quick   # smoke check, a few minutes -> results/quick/budget_search.json
    python benchmarks/budget_search.py           # full run (~1 h on 2 cores) -> results/budget_search.json + .png
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS_DIR,
    format_table,
    interleaved_timing,
    machine_info,
    machine_summary,
    ort_cpu_runner,
    stats_dict,
    torch_cpu_runner,
    write_results,
)

from lut_service.client import AgentClient
from lut_service.local import LocalAgent
from lut_service.lut import LutTable, save_document
from lut_service.timing import ort_session
from pose.counting import count
from pose.export import export_onnx
from pose.models import PRESETS, build_model
from pose.proxy import PROXY, QUICK_PROXY, Proxy, train_and_score
from pose.space import MBCONV_OPS, ArchSpec, TableSpec, get_space

BACKENDS = ("onnxruntime-cpu", "torch-cpu")
REFERENCE = "efficientpose-a"
BASELINES = (REFERENCE, "mobilenetv2")
INPUT = (256, 256)
JOINTS = 16
QUICK_BUDGET = {"warmup_runs": 1, "warmup_s": 0.0, "min_samples": 3, "max_samples": 5, "max_seconds": 0.02}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes (smoke check)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.45, 0.6, 0.8], help="budgets, x A's cost")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--random", type=int, default=5, help="random networks at the middle ORT budget")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--proxy-images", type=int, help="a reduced proxy: this many training images (time-boxed runs)")
    parser.add_argument("--proxy-epochs", type=int, help="a reduced proxy: this many epochs")
    parser.add_argument("--jobs", type=int, default=2, help="searches / trainings run at once (default 2)")
    parser.add_argument("--repeats", type=int, default=40, help="latency rounds (default 40)")
    parser.add_argument("--workdir", type=Path, help="keep LUTs, searches and runs here (default: a temp folder)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--remeasure",
        type=Path,
        metavar="JSON",
        help="only time the networks of an earlier results file again (on a quieter machine) and rewrite it",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shares, args.seeds, args.random, args.repeats = [0.6], [0], 2, 5
    args.proxy = QUICK_PROXY if args.quick else PROXY
    if args.proxy_images or args.proxy_epochs:
        images = args.proxy_images or int(args.proxy.data.rsplit(":", 1)[1])
        args.proxy = replace(
            args.proxy,
            name=f"{args.proxy.name}-reduced",
            data=f"{args.proxy.data.rsplit(':', 1)[0]}:{images}",
            epochs=args.proxy_epochs or args.proxy.epochs,
        )
    args.middle = sorted(args.shares)[len(args.shares) // 2]
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. LUTs and budgets


def build_luts(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    spec = TableSpec("small", INPUT, joints=JOINTS)
    luts = {}
    if all((work / f"lut-{b}.json").is_file() for b in BACKENDS):  # a resumed run keeps its tables
        return {b: {"path": work / f"lut-{b}.json", "doc": json.loads((work / f"lut-{b}.json").read_text()),
                    "seconds": None} for b in BACKENDS}  # fmt: skip
    with LocalAgent(work / "agent.db") as agent, AgentClient(agent.url, cache_dir=work / "cache") as client:
        for backend in BACKENDS:
            t0 = time.perf_counter()
            doc = client.request_lut(spec, backend, budget=QUICK_BUDGET if args.quick else None,
                                     progress=not args.no_progress, poll_s=0.2)  # fmt: skip
            luts[backend] = {"path": save_document(doc, work / f"lut-{backend}.json"), "doc": doc,
                             "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            say(f"[lut] {backend}: {len(doc['entries'])} entries in {luts[backend]['seconds']} s")
    return luts


def flops_of(arch: ArchSpec | str) -> float:
    return count(build_model(arch, JOINTS), INPUT).gflops_paper


def targets(args: argparse.Namespace, luts: dict[str, dict]) -> dict[str, dict]:
    """The searches: name -> cost source, target value and unit."""
    tables = {b: LutTable.from_document(luts[b]["doc"]) for b in BACKENDS}
    a = PRESETS[REFERENCE]
    reference = {"onnxruntime-cpu": tables["onnxruntime-cpu"].predict(a), "torch-cpu": tables["torch-cpu"].predict(a),
                 "flops": flops_of(REFERENCE)}  # fmt: skip
    out = {}
    for share in args.shares:
        out[f"ort@{share:g}"] = {"cost": "onnxruntime-cpu", "share": share}
    # the ablation of the task term: the same middle ORT search with log(MSE) instead of MSE (search.loop)
    out[f"ort@{args.middle:g}-log"] = {"cost": "onnxruntime-cpu", "share": args.middle, "task_term": "log-mse"}
    out[f"torch@{args.middle:g}"] = {"cost": "torch-cpu", "share": args.middle}
    out[f"flops@{args.middle:g}"] = {"cost": "flops", "share": args.middle}
    for item in out.values():
        item["source"] = "flops" if item["cost"] == "flops" else str(luts[item["cost"]]["path"])
        item["target"] = item["share"] * reference[item["cost"]]
        item["unit"] = "GFLOPs" if item["cost"] == "flops" else "ms"
    return {"searches": out, "reference_cost": reference}


# --------------------------------------------------------------------------- 2. searches


def search_command(item: dict, proxy: Proxy, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "effpose.cli", "search", "--space", "small", "--data", proxy.data,
           "--input", f"{proxy.input_hw[0]}x{proxy.input_hw[1]}", "--cost", item["source"],
           "--target", f"{item['target']:.6f}", "--seed", str(args.search_seed), "--threads", "1",
           "--no-progress", "--json", "--out", str(out)]  # fmt: skip
    if "task_term" in item:
        cmd += ["--task-term", item["task_term"]]
    if args.quick:
        cmd += ["--warmup-epochs", "0", "--epochs", "2", "--max-batches", "2"]
    return cmd


def run_searches(args: argparse.Namespace, plan: dict[str, dict], work: Path) -> dict[str, dict]:
    """The searches, ``--jobs`` at a time, each an ``effpose search`` process (its own CLI, as a user runs it)."""
    pending = dict(plan)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    results: dict[str, dict] = {}
    for name in list(pending):  # a resumed run keeps the searches that finished
        done = work / f"search-{name}.json"
        if done.is_file() and done.read_text().strip():
            summary = json.loads(done.read_text())
            results[name] = {**plan[name], "summary": summary, "seconds": None, "arch": ArchSpec.load(summary["arch"])}
            del pending[name]
    while pending or running:
        while pending and len(running) < args.jobs:
            name, item = pending.popitem()
            out = work / f"search-{name}"
            with (work / f"search-{name}.err").open("w") as err, (work / f"search-{name}.json").open("w") as res:
                proc = subprocess.Popen(search_command(item, args.proxy, out, args), stdout=res, stderr=err)
            running[name] = (proc, time.perf_counter(), work / f"search-{name}.json")
            say(f"[search] {name}: target {item['target']:.4g} {item['unit']} started")
        time.sleep(1.0)
        for name, (proc, t0, result_path) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                raise RuntimeError(f"search {name} failed ({proc.returncode}); see {work}/search-{name}.err")
            summary = json.loads(result_path.read_text())
            results[name] = {**plan[name], "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
                             "arch": ArchSpec.load(summary["arch"])}  # fmt: skip
            say(f"[search] {name}: {' '.join(summary['ops'])} ({results[name]['seconds']:.0f} s)")
    return results


# --------------------------------------------------------------------------- 3. random networks


def random_ops_at_density(space, rng: random.Random) -> list[str]:  # noqa: ANN001 - pose.space.SearchSpace
    """A random legal network whose share of ``skip`` is itself random: ``q ~ U(0, 1)``, then each layer is
    ``skip`` with probability ``q`` where legal, else a uniform MBConv. Uniform ops alone almost never reach
    a tight budget (60 % of A lies in their far tail: no hit in 200k draws), so this spans the whole range."""
    q = rng.random()
    return [
        "skip" if layer.skip_reason() is None and rng.random() < q else rng.choice(MBCONV_OPS)
        for layer in space.layers()
    ]


def random_at_budget(ort_table: LutTable, target: float, count_wanted: int, seed: int) -> tuple[list, int]:
    """The first ``count_wanted`` random legal networks (``random_ops_at_density``) predicted within +-5 % of
    ``target``, in draw order: nothing about them is chosen but their predicted cost."""
    rng = random.Random(seed)
    space = get_space("small")
    found, draws = [], 0
    while len(found) < count_wanted and draws < 200_000:
        draws += 1
        arch = ArchSpec(space="small", ops=random_ops_at_density(space, rng), name=f"random-{len(found)}")
        if abs(ort_table.predict(arch) / target - 1) <= 0.05:
            found.append(arch)
    if len(found) < count_wanted:
        raise RuntimeError(f"only {len(found)} random networks within 5% of {target:.3f} ms in {draws} draws")
    return found, draws


# --------------------------------------------------------------------------- 4. training


def _train_one(job: tuple[str, str, int, str, Proxy]) -> dict:
    name, arch, seed, out, proxy = job
    done = Path(out) / "score.json"
    if done.is_file():  # a resumed run keeps the trainings that finished
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    result = train_and_score(arch, proxy, seed, out)
    result["network"] = name
    done.write_text(json.dumps(result))
    return result


def train_all(args: argparse.Namespace, archs: dict[str, ArchSpec | str], work: Path) -> dict[str, list[dict]]:
    jobs = []
    for name, arch in archs.items():
        path = arch if isinstance(arch, str) else str(work / f"{name}.arch.json")
        if not isinstance(arch, str):
            arch.save(path)
        jobs += [(name, path, seed, str(work / f"train-{name}-s{seed}"), args.proxy) for seed in args.seeds]
    say(f"[train] {len(jobs)} runs ({len(archs)} networks x {len(args.seeds)} seeds), {args.jobs} at a time")
    scores: dict[str, list[dict]] = {name: [] for name in archs}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for i, result in enumerate(pool.map(_train_one, jobs), 1):
            scores[result["network"]].append(result)
            say(f"[train] {i}/{len(jobs)} {result['network']} seed {result['seed']}: PCKh {result['Mean']:.2f}")
    return scores


# --------------------------------------------------------------------------- 5. latency


def measure_latency(args: argparse.Namespace, archs: dict[str, ArchSpec | str], work: Path) -> dict[str, dict]:
    images = np.random.default_rng(0).standard_normal((1, 3, *INPUT), dtype=np.float32)
    runners = {}
    for name, arch in archs.items():
        model = build_model(arch, JOINTS).eval()
        onnx_path = export_onnx(model, work / f"{name}.onnx", INPUT, 1)
        runners[f"{name}|onnxruntime-cpu"] = ort_cpu_runner(ort_session(onnx_path, 1), images)
        runners[f"{name}|torch-cpu"] = torch_cpu_runner(model, torch.from_numpy(images), 1)
    say(f"[latency] {len(runners)} candidates interleaved, {args.repeats} rounds")
    stats = interleaved_timing(runners, repeats=args.repeats, warmup=3, max_seconds=600, seed=0,
                               progress=not args.no_progress)  # fmt: skip
    out: dict[str, dict] = {}
    for label, timing in stats.items():
        name, backend = label.split("|")
        out.setdefault(name, {})[backend] = stats_dict(timing)
    return out


# --------------------------------------------------------------------------- report


def describe(name: str, arch: ArchSpec | str, scores: list[dict], latency: dict, tables: dict) -> dict:
    values = [s["Mean"] for s in scores]
    entry = {
        "ops": arch.ops if isinstance(arch, ArchSpec) else None,
        "gflops_paper": round(flops_of(arch), 4),
        "measured_ms": {b: latency[b]["median_ms"] for b in BACKENDS},
        "latency": latency,
        "pckh": values,
        "pckh_mean": float(np.mean(values)),
        "pckh_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "runs": scores,
    }
    spec = arch if isinstance(arch, ArchSpec) else PRESETS.get(arch)
    if spec is not None:
        entry["predicted_ms"] = {b: tables[b].predict(spec) for b in BACKENDS}
    return entry


def measured_cost(net: dict, cost: str) -> float:
    return net["gflops_paper"] if cost == "flops" else net["measured_ms"][cost]


def verdicts(networks: dict[str, dict], searches: dict[str, dict], args: argparse.Namespace) -> dict:
    """Searched vs random at the middle ORT budget, and the specialisation matrix with its plain answers."""
    mid = f"ort@{args.middle:g}"
    searched = [n for n in (mid, f"{mid}-log") if n in networks]
    randoms = [n for n in networks if n.startswith("random-")]
    score = {n: networks[n]["pckh_mean"] for n in [*searched, *randoms]}
    ranking = sorted(score, key=lambda n: -score[n])
    # each searched network against the same random ones: 1 + the random networks that score higher
    ranks = {name: 1 + sum(score[r] > score[name] for r in randoms) for name in searched}
    own = {}
    names = [mid, f"torch@{args.middle:g}", f"flops@{args.middle:g}"]
    for name in names:
        cost, target = searches[name]["cost"], searches[name]["target"]
        fits = [n for n in names if measured_cost(networks[n], cost) <= 1.05 * target]
        best = max(fits, key=lambda n: networks[n]["pckh_mean"]) if fits else None
        own[name] = {
            "cost": cost, "target": target, "measured": measured_cost(networks[name], cost),
            "meets_own_budget_within_5pct": measured_cost(networks[name], cost) <= 1.05 * target,
            "fit_this_budget": fits, "most_accurate_that_fits": best, "own_is_best": best == name,
        }  # fmt: skip
    return {
        "searched_vs_random": {"random": randoms, "searched": mid, "searched_rank": ranks[mid],
                               "ranks": ranks, "out_of": len(randoms) + 1,
                               "ranking": ranking},  # fmt: skip
        "specialisation": own,
    }


def plot(networks: dict[str, dict], searches: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, net in networks.items():
        x, y, err = net["measured_ms"]["onnxruntime-cpu"], net["pckh_mean"], net["pckh_std"]
        if name.startswith("ort@") and name.endswith("-log"):
            style = {"marker": "^", "color": "tab:red", "label": "searched (ORT budget, log-MSE task term)"}
        elif name.startswith("ort@"):
            style = {"marker": "o", "color": "tab:orange", "label": "searched (ORT budget)"}
        elif name in searches:
            style = {"marker": "D", "color": "tab:green" if name.startswith("torch") else "tab:blue",
                     "label": f"searched ({searches[name]['cost']} budget)"}  # fmt: skip
        elif name.startswith("random-"):
            style = {"marker": "x", "color": "0.5", "label": "random at the middle ORT budget"}
        else:
            style = {"marker": "s", "color": "k", "label": name}
        ax.errorbar(x, y, yerr=err, capsize=3, linestyle="none", markersize=7, **style)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for name, item in searches.items():
        if name.startswith("ort@") and not name.endswith("-log"):
            ax.axvline(item["target"], color="tab:orange", alpha=0.25, linestyle="--")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("measured onnxruntime-cpu latency, 1 thread, batch 1, 256x256 (ms); dashed: ORT budgets")
    ax.set_ylabel("proxy PCKh@0.5 Mean (mean ± std over seeds)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(networks: dict[str, dict], searches: dict[str, dict], verdict: dict) -> None:
    rows = []
    for name, net in networks.items():
        target = searches.get(name, {})
        rows.append([
            name, f"{target['target']:.3g} {target['unit']}" if target else "-", net["gflops_paper"],
            net["measured_ms"]["onnxruntime-cpu"], net.get("predicted_ms", {}).get("onnxruntime-cpu"),
            net["measured_ms"]["torch-cpu"], net.get("predicted_ms", {}).get("torch-cpu"),
            f"{net['pckh_mean']:.2f} ± {net['pckh_std']:.2f}",
        ])  # fmt: skip
    headers = ["network", "budget", "GFLOPs", "ORT ms", "ORT LUT", "torch ms", "torch LUT", "PCKh@0.5"]
    print(format_table(headers, rows))
    svr = verdict["searched_vs_random"]
    for name, rank in svr["ranks"].items():
        print(f"searched vs random at equal budget: {name} ranks {rank} of {svr['out_of']}")
    for name, v in verdict["specialisation"].items():
        print(
            f"{name}: measured {v['measured']:.4g} vs budget {v['target']:.4g} "
            f"({'met' if v['meets_own_budget_within_5pct'] else 'MISSED'} within +5%); fit that budget: "
            f"{', '.join(v['fit_this_budget']) or 'none'}; most accurate of those: {v['most_accurate_that_fits']}"
            f" -> own network {'IS' if v['own_is_best'] else 'is NOT'} the best"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.remeasure is not None:
        return remeasure(args)
    info = machine_info()
    say(f"machine: {machine_summary(info)}")
    started, stages = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="budget_search_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        luts = build_luts(args, work)
        plan = targets(args, luts)
        stages["luts"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        searches = run_searches(args, plan["searches"], work)
        stages["searches"] = round(time.perf_counter() - t0, 1)
        tables = {b: LutTable.from_document(luts[b]["doc"]) for b in BACKENDS}
        mid = searches[f"ort@{args.middle:g}"]["target"]
        randoms, draws = random_at_budget(tables["onnxruntime-cpu"], mid, args.random, args.search_seed)
        archs: dict[str, ArchSpec | str] = {n: s["arch"] for n, s in sorted(searches.items())}
        archs.update({a.name: a for a in randoms})
        archs.update({b: b for b in BASELINES})
        t0 = time.perf_counter()
        scores = train_all(args, archs, work)
        stages["training"] = round(time.perf_counter() - t0, 1)
        load_before_latency = info_load()
        t0 = time.perf_counter()
        latency = measure_latency(args, archs, work)
        stages["latency"] = round(time.perf_counter() - t0, 1)
    networks = {n: describe(n, a, scores[n], latency[n], tables) for n, a in archs.items()}
    verdict = verdicts(networks, searches, args)
    searches_json = {n: {k: v for k, v in s.items() if k != "arch"} for n, s in searches.items()}
    data = {
        "networks": networks, "searches": searches_json, "verdict": verdict,
        "reference_cost": plan["reference_cost"], "random_draws": draws,
        "proxy": {**args.proxy.__dict__}, "seeds": args.seeds, "shares": args.shares,
        "load_average_before_latency": load_before_latency, "stage_seconds": stages,
        "total_seconds": round(time.perf_counter() - started, 1),
        "luts": {b: {"id": luts[b]["doc"]["id"], "entries": len(luts[b]["doc"]["entries"]),
                     "seconds": luts[b]["seconds"]} for b in BACKENDS},
    }  # fmt: skip
    path = write_results("budget_search", data, args.results_dir, quick=args.quick)
    print_report(networks, searches, verdict)
    plot(networks, searches, path.with_suffix(".png"), f"small space, proxy {args.proxy.name}; {info['cpu_model']}")
    print(f"results: {path} (+ .png); total {data['total_seconds']:.0f} s")
    return 0


def remeasure(args: argparse.Namespace) -> int:
    """Latency again for the networks of ``args.remeasure``; the verdicts are recomputed, nothing else changes."""
    data = json.loads(args.remeasure.read_text())
    archs = {n: (ArchSpec(space="small", ops=v["ops"], name=n) if v["ops"] else n) for n, v in data["networks"].items()}
    load = info_load()
    with tempfile.TemporaryDirectory(prefix="budget_search_") as tmp:
        latency = measure_latency(args, archs, Path(tmp))
    for name, net in data["networks"].items():
        net["latency"] = latency[name]
        net["measured_ms"] = {b: latency[name][b]["median_ms"] for b in BACKENDS}
    args.middle = sorted(data["shares"])[len(data["shares"]) // 2]
    data["verdict"] = verdicts(data["networks"], data["searches"], args)
    data["load_average_before_latency"] = load
    data.setdefault("remeasured", []).append({"load_average_before": load, "at": time.strftime("%Y-%m-%d %H:%M")})
    args.remeasure.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print_report(data["networks"], data["searches"], data["verdict"])
    plot(data["networks"], data["searches"], args.remeasure.with_suffix(".png"), f"remeasured at load {load}")
    return 0


def info_load() -> list[float]:
    return [round(x, 2) for x in machine_info()["load_average_1_5_15"]]


if __name__ == "__main__":
    sys.exit(main())
