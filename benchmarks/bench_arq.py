"""ARQ mixed-precision search on the MNIST CNN trained with Gaussian noise: certified accuracy and ACR of the float
model, uniform 8/4/2-bit integer models and the searched mixed-precision models (ACR and accuracy rewards).

    python benchmarks/bench_arq.py [--sigma 0.25 0.5] [--images 1000] [--n 10000] [--n0 100] [--alpha 0.001]
                                   [--search-images 100] [--search-n 1000] [--episodes 30] [--budget w4a4]
                                   [--bits 2 4 8] [--train-epochs 10] [--finetune-epochs 1]
                                   [--finetune-images 0] [--threads 1] [--device cpu|cuda]

Per sigma (in [0, 1] pixel units up to 256/255: the pow2 input grid is v = x / 256):

* the CNN (``model.arch = 'cnn'``, the default conv layers [16, 4, 2, 1], [32, 4, 2, 1], one hidden dense layer of
  100) is trained by ``qverify train`` with ``train.method = 'float-ibp'``, ``train.eps = 0`` (plain float training)
  and ``train.noise_sigma = sigma`` on ``data.train = 'mnist-5k'`` for ``--train-epochs``;
* ``float``: that float model as the base classifier (float64 torch forward on the noisy inputs mapped to the
  same integer grid), CERTIFY with the same noise as the integer models;
* ``uniform wXaX``: every layer at X bits, made as each search candidate is (``--finetune-epochs`` of QAT with
  Gaussian noise from the float checkpoint; 0: post-training quantization);
* ``ARQ (acr)``: the DDPG search (``--episodes``) at the ``--budget`` (default the W4A4 equivalent), reward ACR on
  the first ``--search-images`` images with ``--search-n`` samples; ``ARQ (accuracy)`` beside it: the same search
  with the base classifier's clean accuracy as the reward (HAQ's);

each certified with ``--n`` samples (n0 ``--n0``, ``--alpha``) on the first ``--images`` MNIST test images of
``../shared/data/mnist_test_first1000.npz``: certified accuracy at l2 radii 0.25 / 0.5 / 1.0, ACR, BitOps, the
search and certification time (wall seconds on this machine). JSON under ``benchmarks/out/bench_arq.json``; the
search directories (trace, model, certificate) under ``benchmarks/out/arq/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, OUT, print_table, write_json  # noqa: E402
from qverify.mixed_precision import ARQEvaluator, parse_budget, run_search  # noqa: E402
from qverify.smooth import InputQuantizer, Sampler, centers, certify_sample, smooth, summarize_smoothing  # noqa: E402

RADII = [0.25, 0.5, 1.0]


class FloatEngine:
    """The float model as a smoothing base classifier on the integer grid of ``net`` (what the trainer feeds it)."""

    def __init__(self, fm, net) -> None:  # noqa: ANN001 - a FloatModel and a QNetwork of the same grid
        self.fm, self.net, self.device, self.name = fm, net, "cpu", "float64 torch model"

    def classes(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.argmax(self.fm.forward(x.reshape((-1, *self.fm.input_shape))), axis=1)


def smooth_float(fm, net, images: np.ndarray, labels: np.ndarray, sigma: float, n0: int, n: int,  # noqa: ANN001
                 alpha: float) -> dict:
    """CERTIFY of the float model with the integer pipeline's noise (same seeds, same grid mapping)."""
    eng = FloatEngine(fm, net)
    q = InputQuantizer.of(net)
    r0, r0x = centers(net, images)
    recs = []
    for i in range(len(labels)):
        t = time.monotonic()
        smp = Sampler(q, r0[i], None if r0x is None else r0x[i], sigma, 0, i)
        cert, _ = certify_sample(eng, smp, n0, n, alpha, 1000)
        recs.append({"prediction": cert.prediction, "radius": cert.radius,
                     "correct": cert.prediction == int(labels[i]), "seconds": time.monotonic() - t})
    return summarize_smoothing(recs, RADII)


def train_cnn(sigma: float, epochs: int, out: Path, threads: int) -> Path:
    from qverify.train import load_config, train

    ckpt = out / f"cnn_noise{sigma:g}"
    cfg = load_config(None, ["data.train='mnist-5k'", "model.arch='cnn'", "model.hidden=[100]",
                             "train.method='float-ibp'", "train.eps=0.0", f"train.noise_sigma={sigma}",
                             f"train.epochs={epochs}", "train.lr_milestones=[]", "progress=false",
                             f"threads={threads}", f"out_dir='{ckpt}'", f"name='mnist_cnn_noise{sigma:g}'"])
    train(cfg, resume=True)
    return ckpt


def row(sigma: float, model: str, summ: dict, bitops: int | None, bits: str, search_s: float | None,
        cert_s: float) -> dict:
    return {"sigma": sigma, "model": model, "bits": bits, "BitOps": bitops, "clean": summ["clean_accuracy"],
            **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in summ["certified"]}, "ACR": summ["acr"],
            "search_s": search_s, "cert_s": cert_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--search-images", type=int, default=100)
    ap.add_argument("--search-n", type=int, default=1000)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--budget", default="w4a4")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--train-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-images", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (numpy executor), or cuda: fine-tuning and smoothing there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = np.load(MNIST1000)
    images, labels = d["images"][:args.images], d["labels"][:args.images]
    work = OUT / "arq"
    rows, times = [], {}
    for sigma in args.sigma:
        t = time.monotonic()
        ckpt = train_cnn(sigma, args.train_epochs, work, args.threads)
        times[f"train {sigma:g}"] = time.monotonic() - t
        print(f"sigma {sigma}: trained in {times[f'train {sigma:g}']:.0f} s", file=sys.stderr)
        ev = ARQEvaluator(ckpt, images, labels, sigma, allowed=args.bits, n0=args.n0, n=args.search_n,
                          alpha=args.alpha, search_images=args.search_images, finetune_epochs=args.finetune_epochs,
                          threads=args.threads, finetune_images=args.finetune_images, device=args.device)
        sp = ev.space
        budget = parse_budget(args.budget, sp)
        from qverify.quantize import from_quantnet

        t = time.monotonic()
        net8 = ev.network(sp.uniform(8, 8))
        fs = smooth_float(from_quantnet(ev.model), net8, images, labels, sigma, args.n0, args.n, args.alpha)
        rows.append(row(sigma, "float", fs, None, "fp64", None, time.monotonic() - t))
        print(f"sigma {sigma}: float done", file=sys.stderr)
        for b in sorted(set(args.bits), reverse=True):
            c = sp.uniform(b, b)
            t = time.monotonic()
            net = net8 if b == 8 else ev.network(c)
            ev_kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch=1000, seed=0, progress=False,
                         device="numpy" if args.device == "cpu" else args.device)
            s = smooth(net, images, labels, sigma, results_path=work / f"uniform_s{sigma:g}_w{b}a{b}.jsonl",
                       overwrite=True, **ev_kw).summary(RADII)
            rows.append(row(sigma, f"uniform w{b}a{b}", s, sp.bitops(c), c.key, None, time.monotonic() - t))
            print(f"sigma {sigma}: uniform {b} done", file=sys.stderr)
        for reward in ("acr", "accuracy"):
            out = work / f"search_s{sigma:g}_{reward}"
            t = time.monotonic()
            res = run_search(ckpt, images, labels, sigma, out, allowed=args.bits, budget=args.budget, search="ddpg",
                             episodes=args.episodes, reward=reward, n0=args.n0, search_n=args.search_n, n=args.n,
                             alpha=args.alpha, search_images=args.search_images,
                             finetune_epochs=args.finetune_epochs, finetune_images=args.finetune_images,
                             threads=args.threads, device=args.device, overwrite=True,
                             command=" ".join(["python", *sys.argv]))
            ch = res["chosen"]
            rows.append(row(sigma, f"ARQ ({reward})", res["certificate"]["summary"], ch["bitops"], ch["key"],
                            res["search_seconds"], time.monotonic() - t - res["search_seconds"]))
            rows[-1]["evaluated"] = res["evaluations"]
            print(f"sigma {sigma}: search {reward} done ({res['search_seconds']:.0f} s)", file=sys.stderr)
        rows.append({"sigma": sigma, "model": f"(budget {args.budget})", "BitOps": budget})
    print(f"MNIST CNN (mnist-5k, Gaussian-noise float training {args.train_epochs} epochs); {args.images} test images, "
          f"n0 {args.n0}, n {args.n}, alpha {args.alpha}; search: ddpg {args.episodes} episodes, widths {args.bits}, "
          f"{args.search_images} images, n {args.search_n}, fine-tune {args.finetune_epochs} epoch(s)"
          + (f" on {args.finetune_images} images" if args.finetune_images else "")
          + f"; {args.threads} torch thread(s)")
    print_table(rows, ["sigma", "model", "bits", "BitOps", "clean", "cert@0.25", "cert@0.5", "cert@1", "ACR",
                       "evaluated", "search_s", "cert_s"])
    path = write_json("bench_arq", {"args": vars(args), "rows": rows, "times": times,
                                    "layers": [{**lay.__dict__, "macs": lay.macs} for lay in sp.layers]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
