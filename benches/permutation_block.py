"""One LLaMA-7B block's folded permutation searches on this host's CPU cores: one after
another (`search_permutation` per problem, as `search_block` ran them before) against all
at once (`search_permutations`), checking the orders are the same; then down_proj's search
alone on 1, 4, 8 and 16 threads (how far one search scales).

    python benches/permutation_block.py

Scores are RIA scores of random bf16 weights (`ria_score`, random activation norms).
Writes benches/results/permutation_block.json (or $OUT/ when set).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ria.core import ria_score, search_permutation, search_permutations


def score(out: int, inp: int) -> np.ndarray:
    w = (torch.randn(out, inp) * 0.02).to(torch.bfloat16)
    return ria_score(w, torch.rand(inp) * 10, 0.5)


def main() -> None:
    torch.manual_seed(0)
    q, k, v, o = (score(4096, 4096) for _ in range(4))
    g, u, d = score(11008, 4096), score(11008, 4096), score(4096, 11008)
    heads = [[o[:, h * 128 : (h + 1) * 128]] for h in range(32)]
    problems = [[q, k, v], [g, u], [d], *heads]
    res: dict[str, object] = {"cpu_cores": os.cpu_count()}
    t0 = time.perf_counter()
    alone = [search_permutation(p, 2, 4) for p in problems]
    res["sequential_s"] = time.perf_counter() - t0
    res["sequential_each_s"] = [r.seconds for r in alone[:3]] + [sum(r.seconds for r in alone[3:])]
    t0 = time.perf_counter()
    together = search_permutations(problems, 2, 4)
    res["batch_s"] = time.perf_counter() - t0
    res["same"] = all((a.perm == b.perm).all() for a, b in zip(alone, together, strict=True))
    res["efficacy"] = [r.efficacy for r in together[:3]]
    t0 = time.perf_counter()
    search_permutation([g, u], 2, 4, max_steps=0, global_steps=0)
    res["mlp_setup_s"] = time.perf_counter() - t0
    for t in (1, 4, 8, 16):
        res[f"down_threads{t}_s"] = search_permutation([d], 2, 4, threads=t).seconds
    print(json.dumps(res, indent=1))
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    (out / "permutation_block.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
