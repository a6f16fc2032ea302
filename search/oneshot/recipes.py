"""Recipes: the seed systems of the field as settings of this engine (METHODS.md section 6).

A recipe is an importance score, an allocation rule, a compensation and the paper's calibration
settings, plus, for two of them, a selection step that picks what the paper lets the data pick:
NIRVANA's calibration seed (lowest KL to the dense model) and AdaPruner's calibration subset and
importance metric (Optuna TPE), both in search/oneshot/selection.py. Recipes are data, registered
by name in :data:`RECIPES`; one pipeline runs them (search/oneshot/pipeline.py):
``llm-pruner prune --method NAME``, experiments/compare.py, and ``prune --importance X
--allocation Y --reform Z``, which is an anonymous recipe (:func:`custom_recipe`).

Calibration text is WikiText-2 validation for every recipe (PROTOCOL.md: no train split here),
with each paper's window count and length; ``notes`` say where a paper used other text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from evaluators.data import CalibrationSpec
from reform.spec import ReformSpec
from search.config import SEARCH_METHODS, STATISTICS_REGION
from search.oneshot.allocation import ALLOCATIONS
from space.errors import UserError
from space.scores import score_spec

NONE = ReformSpec("none", "local")
# The search's statistics (search/config.py defaults): the 2025 anchors calibrate on the same tokens
# as the search they are compared with.
SEARCH_STATISTICS = CalibrationSpec("wikitext2", 64, 512, 0, STATISTICS_REGION)


@dataclass(frozen=True)
class Recipe:
    name: str | None  # None: an anonymous recipe (prune --importance/--allocation/--reform)
    paper: str
    importance: str | None  # None: chosen by the selection step (AdaPruner)
    allocation: str
    reform: ReformSpec
    calibration: CalibrationSpec
    allocation_options: dict = field(default_factory=dict)
    selection: str | None = None  # a name in search.oneshot.selection.SELECTIONS
    selection_options: dict = field(default_factory=dict)
    notes: str = ""
    reform_calibration: CalibrationSpec | None = None  # None: the same windows as the scores

    @property
    def compensation_calibration(self) -> CalibrationSpec:
        return self.reform_calibration or self.calibration

    def to_dict(self) -> dict:
        return {
            "name": self.name, "paper": self.paper, "importance": self.importance, "allocation": self.allocation,
            "allocation_options": self.allocation_options, "reform": self.reform.to_dict(),
            "calibration": self.calibration.to_dict(), "selection": self.selection,
            "selection_options": self.selection_options, "notes": self.notes,
            "reform_calibration": self.compensation_calibration.to_dict() if self.reform.method != "none" else None,
        }

    def with_calibration(self, **changes) -> "Recipe":
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def recipe_spec(name: str) -> Recipe:
    if name in SEARCH_METHODS:
        raise UserError(f"{name} is a search, not a one-shot recipe: llm-pruner search --method {name}")
    if name not in RECIPES:
        raise UserError(f"unknown method {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def custom_recipe(*, importance: str, allocation: str, reform: ReformSpec, calibration: CalibrationSpec,
                  reform_calibration: CalibrationSpec | None = None, mlp_step: int = 1) -> Recipe:
    """The anonymous recipe of ``prune --importance X --allocation Y --reform Z``."""
    score_spec(importance)
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if mlp_step < 1:
        raise UserError("--mlp-step must be at least 1")
    return Recipe(None, "", importance, allocation, reform, calibration, {"mlp_step": mlp_step},
                  reform_calibration=reform_calibration)


for _recipe in (
    Recipe("llm-pruner", "LLM-Pruner (Ma et al., NeurIPS 2023)", "taylor", "uniform-inner", NONE,
           CalibrationSpec("wikitext2", 10, 128, 0), {"first": 4, "last": 2},
           notes="paper: 10 Bookcorpus samples of 128 tokens; element² with --importance taylor-element2"),
    Recipe("flap", "FLAP (An et al., AAAI 2024)", "fluctuation", "global", ReformSpec("bias", "local"),
           CalibrationSpec("wikitext2", 1024, 128, 0), notes="WIFV metric, AL-AM structure, bias compensation"),
    Recipe("wanda-sp", "Wanda-sp (FLAP repository)", "wanda-sp", "uniform", NONE,
           CalibrationSpec("wikitext2", 1024, 128, 0)),
    Recipe("magnitude-sp", "magnitude-sp (FLAP repository)", "magnitude", "uniform", NONE,
           CalibrationSpec("wikitext2", 1, 128, 0), notes="weights only: the calibration is not used"),
    Recipe("nirvana", "NIRVANA (Ai et al., 2025)", "ntk", "two-thresholds", NONE,
           CalibrationSpec("wikitext2", 32, 128, 0), {"gamma": 3.0}, selection="kl-seed",
           selection_options={"seeds": 3, "heldout": 4, "heldout_seqlen": 256},
           notes="whole KV groups; calibration seed with the lowest KL(dense || pruned) on held-out "
                 "validation windows; window count and length are ours (not stated in what we could read)"),
    Recipe("numerical", "Numerical Pruning (Shen et al., AAAI 2025)", "newton", "global",
           ReformSpec("lstsq", "local"), CalibrationSpec("wikitext2", 128, 512, 0),
           notes="global threshold, a query head costing its q/o rows/columns and its share of k/v "
                 "(4·D_h/3 channels for MHA); paper windows are 2048 tokens, 512 here for CPU time"),
    Recipe("bip", "LLM-BIP (block-output influence; our reading, no public code)", "bip", "global", NONE,
           CalibrationSpec("wikitext2", 64, 512, 0),
           notes="one forward pass; global threshold over relative block-output deviations (space/influence.py)"),
    Recipe("adapruner", "AdaPruner (Kong et al., AAAI 2025)", None, "uniform-inner", NONE,
           CalibrationSpec("wikitext2", 10, 128, 0), {"first": 4, "last": 2}, selection="tpe",
           selection_options={"subsets": 4, "metrics": ["taylor-vector", "taylor", "taylor-element2"],
                              "trials": 8, "heldout": 4, "heldout_seqlen": 256},
           notes="TPE over (calibration subset, LLM-Pruner metric); objective = perplexity on held-out "
                 "validation windows; pruning as LLM-Pruner; LoRA recovery is `llm-pruner recover`"),
    Recipe("ziplm", "ZipLM (Kurtic et al., NeurIPS 2023): structured OBS", "ziplm", "uniform",
           ReformSpec("lstsq", "local"), SEARCH_STATISTICS,
           notes="greedy structured OBS, one head or one MLP channel per step, on the dense model's "
                 "statistics; the kept columns refitted by least squares (what the OBS updates converge "
                 "to, with our ridge 1e-4 for the refit and ZipLM's 1e-2 for the order); uniform widths, "
                 "without ZipLM's latency-aware allocation"),
    Recipe("osscar", "OSSCAR (Meng et al., ICML 2024)", "osscar", "uniform", ReformSpec("lstsq", "upstream"),
           SEARCH_STATISTICS,
           notes="greedy OBS (a head / 16 channels per step) then the local swap search on MLP channels at "
                 "the uniform width, block by block on the pruned upstream model's statistics "
                 "(space/scores/osscar.py); least-squares refit on the same statistics"),
    Recipe("shortgpt", "ShortGPT (Men et al., 2024)", "block-influence", "drop-blocks", NONE,
           CalibrationSpec("wikitext2", 64, 512, 0), notes="depth only: whole blocks removed"),
):
    register_recipe(_recipe)
