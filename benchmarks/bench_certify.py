"""certify throughput: QVIP's P1-6 (784-64-32) on the MNIST test images at r = 1, 2, 3, 4.

    python benchmarks/bench_certify.py [--ids 0:1000] [--radii 1 2 3 4] [--timeout 60] [--workers 2]
                                       [--method portfolio] [--no-ray] [--report]

Runs ``certify`` twice on the same instances: the local process pool (``--workers`` processes) and the Ray path on a
local Ray cluster with the same number of CPUs (``ray.init(num_cpus=workers)``; Ray's start-up time is reported
separately and not counted). Reports wall time, instances per second, per-radius verdict counts and the ratio of the
two paths, checks that the decided verdicts agree, and writes ``benchmarks/out/certify.json`` (results files under
``benchmarks/out/certify/``; ``--report`` renders the side-by-side report there). Every run starts from an empty
results file (no resume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, OUT, P1_6, print_table, write_json  # noqa: E402
from qverify.certify import certify  # noqa: E402
from qverify.io.datasets import load_npz  # noqa: E402
from qverify.io.h5 import load_qvip_h5  # noqa: E402
from qverify.settings import VerifySettings  # noqa: E402


def parse_ids(spec: str, n: int) -> list[int]:
    ids: list[int] = []
    for part in spec.split(","):
        if ":" in part:
            a, b = part.split(":", 1)
            ids.extend(range(int(a or 0), int(b) if b else n))
        else:
            ids.append(int(part))
    return ids


def run(label: str, net, images, labels, ids, radii, settings, workers, ray_address, out_dir: Path) -> dict:  # noqa: ANN001
    path = out_dir / f"{label}.jsonl"
    t = time.perf_counter()
    s = certify(net, images, labels, radii, ids=ids, results_path=path, settings=settings, workers=workers,
                ray_address=ray_address, progress=True, model_path=P1_6, data_path=MNIST1000, overwrite=True,
                command=" ".join(sys.argv), log=lambda m: None)
    wall = time.perf_counter() - t
    n = len(s.records)
    print(f"\n{label}: {n} instances in {wall:.1f} s ({n / wall:.1f} instances/s)")
    print(s.format_table())
    return {"label": label, "results": str(path), "wall_seconds": wall, "instances": n,
            "instances_per_second": n / wall, "per_radius": s.rows(),
            "verdicts": {(r["id"], r["radius"]): r["verdict"] for r in s.records}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", default="0:1000", help="samples, e.g. 0:100 or 0:20,300:320 (default 0:1000)")
    ap.add_argument("--radii", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per instance (default 60)")
    ap.add_argument("--workers", type=int, default=2, help="processes / Ray CPUs (default 2)")
    ap.add_argument("--method", default="portfolio", help="verification method (default: the portfolio)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray path")
    ap.add_argument("--report", action="store_true", help="render the comparison report of the two runs")
    args = ap.parse_args()

    net = load_qvip_h5(P1_6)
    images, labels = load_npz(MNIST1000)
    ids = parse_ids(args.ids, len(images))
    settings = VerifySettings(timeout=args.timeout, method=args.method)
    out_dir = OUT / "certify"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"P1-6 ({net.name}), {len(ids)} samples x radii {args.radii} = {len(ids) * len(args.radii)} instances, "
          f"timeout {args.timeout} s, {args.workers} workers, method {args.method}")

    runs = [run("local", net, images, labels, ids, args.radii, settings, args.workers, None, out_dir)]
    ray_start = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("ray is not installed (pip install 'qverify[ray]'): Ray path skipped")
        else:
            t = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray_start = time.perf_counter() - t
            print(f"local Ray cluster with {args.workers} CPUs started in {ray_start:.1f} s (not counted)")
            try:
                runs.append(run("ray", net, images, labels, ids, args.radii, settings, args.workers, "auto",
                                out_dir))
            finally:
                ray.shutdown()

    rows = [{"path": r["label"], "instances": r["instances"], "wall s": r["wall_seconds"],
             "inst/s": r["instances_per_second"]} for r in runs]
    print()
    print_table(rows, ["path", "instances", "wall s", "inst/s"])
    payload: dict = {"benchmark": "certify", "model": str(P1_6), "data": str(MNIST1000), "ids": args.ids,
                     "radii": args.radii, "timeout": args.timeout, "method": args.method, "workers": args.workers,
                     "ray_startup_seconds": ray_start,
                     "runs": [{k: v for k, v in r.items() if k != "verdicts"} for r in runs]}
    if len(runs) == 2:
        a, b = runs[0]["verdicts"], runs[1]["verdicts"]
        decided = ("robust", "counterexample", "misclassified")
        clash = [k for k in a if a[k] in decided and b.get(k) in decided and a[k] != b[k]]
        ratio = runs[1]["wall_seconds"] / runs[0]["wall_seconds"]
        payload["ray_over_local_wall_ratio"] = ratio
        payload["decided_verdict_disagreements"] = len(clash)
        print(f"Ray / local wall time: {ratio:.2f}; decided verdicts that disagree: {len(clash)}")
        if clash:
            print("DISAGREEMENT (a bug):", clash[:10])
    if args.report:
        from qverify.report import render_report

        paths = render_report([r["results"] for r in runs], out_dir / "report")
        print(f"report: {paths['html']}")
    print(f"wrote {write_json('certify', payload)}")


if __name__ == "__main__":
    main()
