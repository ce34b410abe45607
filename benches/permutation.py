"""Channel permutation: the reference RIA (numpy + scipy, `reference_ria.py`) and ria-rs,
side by side in one process on the same score matrices.

    python benches/permutation.py                  # everything (the reference takes ~30 min)
    python benches/permutation.py --only apex llm-4096x4096

Matrices:
- apex: NVIDIA apex's README example, `np.random.seed(1); np.random.rand(128, 64)`;
- llm-RxC: LLM-like scores, |N(0,1)| x log-normal(sigma=1) column scale x log-normal
  (sigma=0.3) row scale (heavy-tailed input channels);
- smollm2-*: real RIA scores (a=0.5) of SmolLM2-135M's middle block (15 of 30), from 32
  windows of 256 tokens of calibration text, grouped as the pipeline groups them
  (q/k/v stacked, gate/up stacked, down; o_proj per key/value head is in the pipeline
  only, as its problem is restricted to within-head orders).

Prints retained score, upper bound, efficacy and wall time of each solver, and writes
benches/results/permutation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import reference_ria as reference
import torch

import ria

RESULTS = Path(__file__).parent / "results" / "permutation.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def llm_like(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    col = rng.lognormal(0.0, 1.0, cols)[None, :]
    row = rng.lognormal(0.0, 0.3, rows)[:, None]
    return (np.abs(rng.standard_normal((rows, cols))) * col * row).astype(np.float32)


def apex() -> np.ndarray:
    np.random.seed(1)
    return np.random.rand(128, 64).astype(np.float32)


def smollm2_scores() -> dict[str, np.ndarray]:
    """RIA scores of SmolLM2-135M's block 15, stacked like the pipeline's shared orders."""
    from ria.demo import load_smollm2
    from ria.pruning import calibration_windows

    model, tokenizer = load_smollm2()
    text = SHARED / "brown_calib.txt"
    source = str(text) if text.exists() else "austen"
    windows = calibration_windows(source, tokenizer, 32, 256, seed=0)
    block = model.model.layers[15]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    sumsq: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sumsq[name] = sumsq.get(name, 0) + (x * x).sum(0)

        return add

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in handles:
        h.remove()
    s = {n: ria.ria_score(block.get_submodule(n).weight, sumsq[n].sqrt()) for n in names}
    return {
        "smollm2-qkv-960x576": np.vstack([s[n] for n in names[:3]]),
        "smollm2-gate-up-3072x576": np.vstack([s[n] for n in names[4:6]]),
        "smollm2-down-576x1536": s[names[6]],
    }


def matrices(only: list[str] | None) -> dict[str, np.ndarray]:
    out = {"apex-128x64": apex()}
    for rows, cols in [(4096, 4096), (4096, 11008)]:
        out[f"llm-{rows}x{cols}"] = llm_like(rows, cols)
    if only is None or any(o.startswith("smollm2") for o in only):
        out.update(smollm2_scores())
    return {k: v for k, v in out.items() if only is None or any(k.startswith(o) for o in only)}


def run_reference(s: np.ndarray, n: int, m: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    perm = reference.reference_permutation(s, n, m)
    return perm, time.perf_counter() - t0


def run_ours(s: np.ndarray, n: int, m: int) -> tuple[ria.PermutationResult, float]:
    t0 = time.perf_counter()
    result = ria.search_permutation(s, n, m, seed=0)
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="matrix name prefixes to run")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow baseline")
    args = parser.parse_args()
    n, m = 2, 4
    rows = []
    for name, s in matrices(args.only).items():
        identity = ria.retained_score(s, n, m)
        ours, t_ours = run_ours(s, n, m)
        row = {
            "matrix": name,
            "shape": list(s.shape),
            "identity": identity,
            "upper_bound": ours.upper_bound,
            "ours": {
                "retained": ours.retained,
                "efficacy": ours.efficacy,
                "seconds": t_ours,
                "lsa_steps": ours.lsa_steps,
                "tabu_steps": ours.tabu_steps,
            },
        }
        if not args.no_reference:
            perm, t_ref = run_reference(s, n, m)
            retained = ria.retained_score(s, n, m, perm)
            row["reference"] = {
                "retained": retained,
                "efficacy": (retained - identity) / (ours.upper_bound - identity),
                "seconds": t_ref,
            }
        rows.append(row)
        print(format_row(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    by_name = {r["matrix"]: r for r in existing.get("rows", [])}
    by_name.update({r["matrix"]: r for r in rows})
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    RESULTS.write_text(json.dumps({"machine": machine, "rows": list(by_name.values())}, indent=2))
    print()
    print(markdown(list(by_name.values())))


def format_row(r: dict) -> str:
    ref = r.get("reference")
    ref_text = f"ref {100 * ref['efficacy']:6.2f}% {ref['seconds']:7.1f}s | " if ref else ""
    o = r["ours"]
    return f"{r['matrix']:<28} {ref_text}ours {100 * o['efficacy']:6.2f}% {o['seconds']:6.1f}s"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| matrix | identity | upper bound | reference RIA: efficacy, time "
        "| ria-rs: efficacy, time | time ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, ref = r["ours"], r.get("reference")
        ref_text = f"{100 * ref['efficacy']:.2f}%, {ref['seconds']:.1f} s" if ref else "-"
        ratio = f"{ref['seconds'] / o['seconds']:.1f}x" if ref else "-"
        lines.append(
            f"| {r['matrix']} | {r['identity']:.6g} | {r['upper_bound']:.6g} | {ref_text} | "
            f"{100 * o['efficacy']:.2f}%, {o['seconds']:.2f} s | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
