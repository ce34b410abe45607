"""What a prune is asked to do, validated once: `Sparsity` (the target pattern) and
`PruneConfig` (every setting of `ria.prune`). The pipeline, the CLI's choices and defaults
and the saved checkpoint's `ria` section all read the same object.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from .._checks import require_bool, require_int
from ..core import SearchOptions
from ..errors import InvalidArgumentError, InvalidTypeError
from ..permutation import PERMUTATION_MODES, PermutationMode

__all__ = [
    "ALPHA_GRID",
    "DEFAULT_ALPHA",
    "DEFAULT_PERMUTATION",
    "METHODS",
    "Method",
    "PruneConfig",
    "Sparsity",
]

Method = Literal["ria", "wanda", "magnitude", "sparsegpt"]
METHODS: tuple[str, ...] = get_args(Method)

# What `permute=True` means. Folded orders cost one gather per group of Linears reading
# one tensor (2 per Llama block, at the norms); free ones keep more importance (README
# "Quality") but, gathered by a separate kernel per Linear, cost 11-23% of the whole
# model's time on the H200 (benches/gather_cost.py).
DEFAULT_PERMUTATION: PermutationMode = "folded"

# RIA's activation exponent `a` (the paper's default).
DEFAULT_ALPHA = 0.5
# The activation exponents `alpha="auto"` chooses from, per layer.
ALPHA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


@dataclass(frozen=True)
class Sparsity:
    """A target: `fraction` of weights pruned, as N:M (keep n of every m) or unstructured."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        """True for N:M patterns."""
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"

    @classmethod
    def parse(cls, value: Sparsity | float | str) -> Sparsity:
        """A `Sparsity`, 0.5 (unstructured) or "2:4" / "4:8" / "N:M" (keep N of every M)."""
        if isinstance(value, Sparsity):
            return value
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match is None:
                try:
                    value = float(value)
                except ValueError:
                    raise InvalidArgumentError(
                        f"bad sparsity {value!r}: use a fraction like 0.5 or N:M like '2:4'"
                    ) from None
            else:
                n, m = int(match[1]), int(match[2])
                if not 1 <= n < m:
                    raise InvalidArgumentError(
                        f"bad sparsity {value!r}: N:M keeps N of every M, 1 <= N < M"
                    )
                return cls(1 - n / m, n, m)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidTypeError(f"sparsity must be a float or an 'N:M' string, got {value!r}")
        value = float(value)
        if not (math.isfinite(value) and 0 <= value < 1):
            raise InvalidArgumentError(f"sparsity must be in [0, 1), got {value}")
        return cls(value)


@dataclass(frozen=True)
class PruneConfig:
    """Every setting of one `ria.prune` call, validated at construction (see `ria.prune`
    for what each means). `per_row=None` resolves to the method's published rule."""

    sparsity: Sparsity = field(default_factory=lambda: Sparsity(0.5))
    method: Method = "ria"
    # False, or the permutation mode ("folded" / "free"); True becomes DEFAULT_PERMUTATION.
    permute: bool | PermutationMode = False
    calibration: Any = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    alpha: float | Literal["auto"] = DEFAULT_ALPHA
    per_row: bool | None = None
    reconstruct: bool = False
    refine: bool = False
    refine_sweeps: int = 8
    # Conjugate-gradient steps of the least-squares refit that ends `reconstruct=True`
    # (pruning/obs.py; 20 measured on SmolLM2, README "Quality"); 0 keeps SparseGPT's update.
    refit_iters: int = 20
    measure_error: bool = False
    seed: int = 0
    device: torch.device | None = None
    progress: bool = True
    batch_size: int = 1
    allow_partial: bool = False
    # A dict of `SearchOptions` settings is accepted and converted (None: no settings); the
    # search's seed is then `seed` unless the dict names its own. A `SearchOptions` object
    # is used as it is, seed included.
    permutation_options: SearchOptions = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        # Normalise what has one obvious meaning, refuse the rest before any work starts.
        set_ = object.__setattr__
        set_(self, "sparsity", Sparsity.parse(self.sparsity))
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        for name in ("reconstruct", "refine", "measure_error", "progress", "allow_partial"):
            require_bool(name, getattr(self, name))
        set_(self, "permute", _permutation_mode(self.permute))
        if self.per_row is None:
            set_(self, "per_row", self.method == "wanda")
        require_bool("per_row", self.per_row)
        if self.per_row and self.method == "sparsegpt" and not self.sparsity.structured:
            raise InvalidArgumentError(
                "per_row=True is not available with method='sparsegpt': its OBS update "
                "selects each 128-column block's weights across all rows"
            )
        for name in ("nsamples", "seqlen", "batch_size", "refine_sweeps"):
            set_(self, name, require_int(name, getattr(self, name), minimum=1))
        set_(self, "refit_iters", require_int("refit_iters", self.refit_iters, minimum=0))
        set_(self, "seed", require_int("seed", self.seed, minimum=0))
        if self.alpha != "auto":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
                raise InvalidTypeError(f"alpha must be a number or 'auto', got {self.alpha!r}")
            if not math.isfinite(self.alpha):
                raise InvalidArgumentError(f"alpha must be finite, got {self.alpha}")
            set_(self, "alpha", float(self.alpha))
        elif self.method != "ria":
            raise InvalidArgumentError(
                f"alpha='auto' chooses RIA's activation exponent; method is {self.method!r}"
            )
        if self.method != "ria" and self.alpha != DEFAULT_ALPHA:
            raise InvalidArgumentError(
                f"alpha is RIA's activation exponent; method {self.method!r} does not use it"
            )
        if self.permute and not self.sparsity.structured:
            raise InvalidArgumentError("permute=True needs an N:M sparsity such as '2:4'")
        if self.device is not None:
            try:
                set_(self, "device", torch.device(self.device))
            except (RuntimeError, TypeError) as exc:
                raise InvalidArgumentError(f"bad device {self.device!r}: {exc}") from None
        options: Any = self.permutation_options
        if options is None:
            options = {}
        if isinstance(options, dict):
            options = SearchOptions(**{"seed": self.seed, **options})
        if not isinstance(options, SearchOptions):
            raise InvalidTypeError(
                "permutation_options must be a dict or a ria.SearchOptions, "
                f"got {type(options).__name__}"
            )
        set_(self, "permutation_options", options)

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is needed (everything but plain magnitude pruning)."""
        return self.method != "magnitude" or self.needs_hessian

    @property
    def needs_hessian(self) -> bool:
        """Whether `X^T X` must be collected: for the OBS update, mask refinement, choosing
        alpha by output error, or reporting each layer's output error."""
        return (
            self.method == "sparsegpt"
            or self.reconstruct
            or self.refine
            or self.alpha == "auto"
            or self.measure_error
        )

    @property
    def needs_reconstruction(self) -> bool:
        """Whether the OBS update runs (SparseGPT, or `reconstruct=True`)."""
        return self.method == "sparsegpt" or self.reconstruct

    @property
    def permutation_mode(self) -> PermutationMode | None:
        """ "folded" or "free", or None without permutation."""
        return self.permute or None  # type: ignore[return-value]  # False -> None

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (what the report and the checkpoint record)."""
        return {
            "method": self.method,
            "sparsity": str(self.sparsity),
            "permute": self.permute,
            "reconstruct": self.reconstruct,
            "refine": self.refine,
            "alpha": self.alpha if self.method == "ria" else None,
            "per_row": self.per_row,
            "calibration": describe_source(self.calibration),
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "refine_sweeps": self.refine_sweeps if self.refine else None,
            "refit_iters": self.refit_iters if self.reconstruct else None,
            "measure_error": self.measure_error,
            **({"permutation_options": self.permutation_options.to_dict()} if self.permute else {}),
        }

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default value, by name (the CLI shows and uses these)."""
        built = cls()
        return {f.name: getattr(built, f.name) for f in fields(cls)}


def _permutation_mode(value: object) -> Literal[False] | PermutationMode:
    if value is True:
        return DEFAULT_PERMUTATION
    if value is False or value is None:
        return False
    if isinstance(value, str) and value in PERMUTATION_MODES:
        return value  # type: ignore[return-value]  # checked against PERMUTATION_MODES
    raise InvalidArgumentError(
        f"permute must be True, False or one of {', '.join(map(repr, PERMUTATION_MODES))}, "
        f"got {value!r}"
    )


def describe_source(calibration: Any) -> str:
    """A short, JSON-ready description of a calibration source."""
    if isinstance(calibration, str):
        return calibration if len(calibration) < 200 else f"text ({len(calibration)} chars)"
    if isinstance(calibration, torch.Tensor):
        return f"token ids {tuple(calibration.shape)}"
    return type(calibration).__name__
