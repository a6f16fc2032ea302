"""What defines a search (:class:`SearchConfig`) and every check of it, made before any model loads."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from evaluators.data import CalibrationSpec, parse_dataset
from reform.spec import MODES, PASS_DTYPES, SELECTIONS, ReformSpec
from search.defaults import (AUTO_EXPORT_CALIB, MIXED_EXPORT_MIN_RATIO, ORDERS_BY_REFIT_ERROR, PLAIN_TRIALS,
                             RECOMMENDED, default_dtype, default_importance, default_order_nsamples)
from search.fitness import KINDS as FITNESS_KINDS
from search.fitness import NAMES as FITNESS_NAMES
from search.samplers import MULTI_OBJECTIVE, SAMPLERS
from search.samplers.evolution import PRESETS as EVOLUTION_PRESETS
from search.samplers.staged import PRESETS as STAGED_PRESETS
from search.widths import PRESETS as WIDTH_PRESETS
from space.errors import UserError
from space.scores import score_spec

DTYPES = ("float32", "bfloat16", "float16")
# Disjoint regions of the calibration text (fractions of its tokens): the statistics of the scores and
# of the least squares, the fitness windows, and the final re-scoring windows never share a token, so
# the fitness cannot reward a fit to its own tokens and the re-scoring is held out from both.
STATISTICS_REGION = (0.0, 0.6)
FITNESS_REGION = (0.6, 0.8)
RESCORING_REGION = (0.8, 1.0)
WINDOW_SETS = ("calibration", "fitness_windows", "final_windows")  # the fields of those windows

# Published search systems as settings of this search (``llm-pruner search --method NAME``; the
# flags given on the command line override them).
# Týr-the-Pruner (METHODS.md section 7): a nested level database per layer from the OSSCAR-style
# local pruner on the pruned upstream model's statistics (the ``osscar`` order: its centre level is
# the uniform width's selection), (1 + λ) evolution with level switches inside attention and inside
# the MLP, selection in stages on growing token counts, top-K KL fitness, coarse-to-fine rounds, and
# the winner refitted on the pruned upstream model's statistics. Scaled to a 2-core CPU: 3 rounds
# (Týr: 4), 16 children, 1 / 4 / 16 windows of 512 tokens per stage, K = 256 (Týr: 8192).
SEARCH_METHODS: dict[str, dict] = {
    "tyr": {"importance": "osscar", "fitness": "kl", "evolution": "staged", "export_reform": "upstream",
            "trials": 260},
}


EVEN_WINDOWS = "even"  # order_seed: windows evenly spaced over the region instead of drawn

SOLVER_DEVICES = ("model", "cpu")  # where the fitness's least-squares state lives

# export_select auto: the units chosen again on the upstream statistics (obs) where the export's text joins
# several sources and the unit order was not already chosen by the refit error, the order's prefix elsewhere
# (experiments/results/calibration_size.md). With the wanda-sp order on WikiText-2 + c4:calib at 0.7, PTB
# validation -3.0 % / -2.6 % (two seeds), every test text but seed 0's WikiText-2 (+0.6 %) lower; on WikiText-2
# alone it lost c4:heldout (+6.5 %: it over-fits one text); over the osscar order on both texts, +3.1 % at 0.5
# and +6.3 % at 0.6 (re-selecting by the criterion the order was made by only adds fitting).
EXPORT_SELECTIONS = ("auto", *SELECTIONS)


@dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search; all but the ``RUNTIME`` fields must match to resume."""

    model: str
    ratio: float
    searcher: str = "evolution"
    trials: int = 100
    seed: int = 0
    ratio_min: float | None = None  # nsga2: the front spans [ratio_min, ratio]
    preset: str = "wide"
    mlp_step: int | None = None
    evolution: str = "cpu"
    importance: str = "wanda-sp"
    calibration: dict = field(
        default_factory=lambda: CalibrationSpec("wikitext2", 64, 512, 0, STATISTICS_REGION).to_dict())
    # the windows the unit order is computed on (None: the statistics' count; their region and seed), and their
    # seed (None: the statistics'; another seed draws the order's windows apart from the statistics' ones; "even":
    # no draw, windows evenly spaced over the statistics' region, the same for every seed)
    order_nsamples: int | None = None
    order_seed: int | str | None = None
    # the order's text (None: the statistics'; sources joined by +, each from the statistics' region): an order
    # over several texts keeps the units every one of them needs, the search and its least squares still fit
    # the statistics' text
    order_calib: str | None = None
    fitness_windows: dict = field(
        default_factory=lambda: CalibrationSpec("wikitext2", 8, 512, 1, FITNESS_REGION).to_dict())
    fitness_reform: str = "lstsq"  # lstsq | none: rectify candidates before scoring them
    # the statistics the fitness's least squares fits on: the dense model's inputs (dense), or those the
    # model pruned like the search's first start gives each layer (upstream: Týr's statistics around one
    # centre, the export's upstream fit made affordable for every candidate)
    fitness_statistics: str = "dense"
    fitness: str = "ppl"  # ppl | kl: perplexity, or KL to the dense model's next-token distributions
    fitness_top_k: int = 256  # kl: tokens of the dense distribution kept per position
    damping: float = 1e-4
    dtype: str = "bfloat16"
    # the dtype of the search's own calibration passes (unit order, fitness statistics; float32: older run folders)
    pass_dtype: str = "float32"
    device: str = "cpu"
    # the fitness's least-squares state: the dtype of L⁻¹ and P (auto: the scoring dtype on a GPU, where
    # it halves the state and ranks candidates as float32 does, Spearman 0.99 within a ratio
    # (experiments/results/solver_precision.md); float32 on the CPU), and where they live (model: on
    # the model's device; cpu: in host memory, each solve copying one layer's rows to the model's device)
    solver_dtype: str = "auto"
    solver_device: str = "model"
    pruner: str = "none"  # none | median (in-process only)
    final_top_k: int = 5
    final_windows: dict = field(
        default_factory=lambda: CalibrationSpec("wikitext2", 32, 512, 2, RESCORING_REGION).to_dict())
    export_reform: str = "local"  # reformation mode of the exported winner (lstsq), as in the fitness
    # calibration windows the export's least squares fits on (None: the statistics' count), drawn from the
    # statistics' region with their seed; more than the fitness needs, since it is fitted once
    export_nsamples: int | None = None
    # upstream export: the dtype its calibration passes run in (the other modes run theirs in float32; a
    # config may keep the default whatever the mode), and whether each layer's kept units are
    # the importance order's prefix or chosen again on the upstream statistics (reform/reselect.py)
    export_pass_dtype: str = "float32"
    export_select: str = "prefix"
    # the export's least squares' ridge: what it pulls toward (zero, or the dense kept weights:
    # reform/lstsq.py) and its size relative to mean(diag XᵀX) (None: ``damping``, the fitness's)
    export_ridge: str = "zero"
    export_damping: float | None = None
    # the export's text: None, the statistics' (what run folders made before the field meant); auto, the
    # statistics' text, with c4:calib beside WikiText-2 above a ratio (export_calibration_spec); or sources
    # joined by +
    export_calib: str | None = None
    eval_windows: int | None = 32  # test windows of 2048 per dataset for the export (None: all)
    # Where the export's perplexity is measured: WikiText-2 test, and text no step calibrated on
    # (PTB test, the held-out half of the local C4 sample), so that a gain that only fits the
    # calibration source shows.
    eval_datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4:heldout")
    max_failures: int = 3  # evaluations failing in a row that stop the job
    trial_timeout: float | None = None  # Ray workers: seconds before a job's actor is taken for stuck
    # GPUs one worker's model spans (a device map places it over them; Ray workers = GPUs / this)
    gpus_per_worker: int = 1

    RUNTIME = ("trials", "pruner", "final_top_k", "eval_windows", "eval_datasets", "max_failures", "trial_timeout",
               "solver_device", "gpus_per_worker", "export_reform", "export_nsamples", "export_pass_dtype", "export_select",
               "export_calib", "export_ridge", "export_damping")

    @classmethod
    def create(cls, model: str, ratio: float, *, calib: str = "wikitext2", nsamples: int = 64,
               calib_seqlen: int = 512, fitness_nsamples: int | None = None, fitness_seqlen: int = 512,
               final_nsamples: int | None = None, seed: int = 0, data_seed: int | None = None,
               chat_template: bool = False, **options) -> "SearchConfig":
        """A config whose statistics, fitness and re-scoring windows come from their disjoint regions
        of ``calib`` (seeds ``data_seed``, ``data_seed + 1``, ``data_seed + 2``; ``data_seed`` is ``seed``
        unless given, so that a search can be repeated on the same windows with another ``seed`` for its
        sampler; each document through the model's chat template when ``chat_template``). ``fitness_nsamples`` defaults to 8
        and ``final_nsamples`` to max(32, 4 x the windows a candidate is scored on); a staged evolution's
        preset sets both (:class:`search.samplers.staged.StagedPreset`). ``options``: the other fields;
        those not given (or None) take the defaults of the day (``RECOMMENDED``, ``importance="auto"``
        resolved by the ratio, the order's windows by the order (:func:`default_order_nsamples`), the dtypes by
        the device (:func:`default_dtype`), the preset's children for a staged evolution, else PLAIN_TRIALS
        trials)."""
        chosen = (*RECOMMENDED, "trials")  # None there: "not given" (the command line's unset flags)
        options = {**RECOMMENDED, **{k: v for k, v in options.items() if k not in chosen or v is not None}}
        if options["importance"] == "auto":
            options["importance"] = default_importance(ratio)
        if options.get("order_calib") == calib:  # the statistics' text, recorded as None (what the field's absence meant)
            options["order_calib"] = None
        order = options.get("order_nsamples")
        # a count equal to the statistics' is recorded as None, what run folders made before the field meant
        options["order_nsamples"] = (default_order_nsamples(options["importance"], nsamples) if order is None
                                     else order if order != nsamples else None)
        for dtype in ("dtype", "pass_dtype", "export_pass_dtype"):
            if options[dtype] == "auto":
                options[dtype] = default_dtype(options.get("device") or cls.device)
        staged = STAGED_PRESETS.get(options["evolution"])
        if options.get("searcher", cls.searcher) != "evolution":
            staged = None
        options.setdefault("trials", staged.children if staged is not None else PLAIN_TRIALS)
        if staged is not None:
            fitness_nsamples = fitness_nsamples or staged.default_fitness_windows()
            final = final_nsamples or staged.default_rescoring_windows()
        else:
            final = final_nsamples or max(32, 4 * (fitness_nsamples or 8))
        data = seed if data_seed is None else data_seed
        return cls(
            model=model, ratio=ratio, seed=seed,
            calibration=CalibrationSpec(calib, nsamples, calib_seqlen, data, STATISTICS_REGION, chat_template).to_dict(),
            fitness_windows=CalibrationSpec(calib, fitness_nsamples or 8, fitness_seqlen, data + 1, FITNESS_REGION,
                                            chat_template).to_dict(),
            final_windows=CalibrationSpec(calib, final, fitness_seqlen, data + 2, RESCORING_REGION,
                                          chat_template).to_dict(),
            **options,
        )

    def to_dict(self) -> dict:
        """The config as plain JSON types (what config.yaml, the study and best.json record)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME}

    @property
    def fitness_name(self) -> str:
        return FITNESS_NAMES[self.fitness]

    @property
    def state_dtype(self) -> str:
        """The dtype the fitness keeps ``L⁻¹`` and ``P`` in (``solver_dtype`` resolved)."""
        if self.solver_dtype != "auto":
            return self.solver_dtype
        return "float32" if self.device == "cpu" else self.dtype

    @property
    def staged(self):
        """The staged-evolution preset of this search, or None."""
        return STAGED_PRESETS.get(self.evolution) if self.searcher == "evolution" else None

    @property
    def multi_objective(self) -> bool:
        return self.searcher in MULTI_OBJECTIVE

    def calibration_spec(self, which: str = "calibration") -> CalibrationSpec:
        """The windows of ``calibration`` (statistics), ``fitness_windows`` or ``final_windows``."""
        return CalibrationSpec.from_dict(getattr(self, which))

    def order_calibration_spec(self) -> CalibrationSpec:
        """The windows the unit order is computed on: ``order_nsamples`` of ``order_calib``'s text (None: the
        statistics') from the statistics' region, drawn with ``order_seed`` (None: the statistics' seed; "even":
        evenly spaced, no seed)."""
        statistics = self.calibration_spec()
        seed = {None: statistics.seed, EVEN_WINDOWS: None}.get(self.order_seed, self.order_seed)
        return dataclasses.replace(statistics, dataset=self.order_calib or statistics.dataset,
                                   nsamples=self.order_nsamples or statistics.nsamples, seed=seed)

    def export_spec(self) -> ReformSpec:
        """The export's least squares (its pass dtype is the upstream mode's; the others run in float32)."""
        pass_dtype = self.export_pass_dtype if self.export_reform == "upstream" else "float32"
        damping = self.damping if self.export_damping is None else self.export_damping
        return ReformSpec("lstsq", self.export_reform, damping=damping, pass_dtype=pass_dtype,
                          select=self.export_selection, ridge=self.export_ridge)

    @property
    def export_selection(self) -> str:
        """``export_select`` resolved: auto is obs for an upstream export on text of several sources over
        an order not made by the refit error."""
        if self.export_select != "auto":
            return self.export_select
        mixed = len(self.export_calibration_spec().parts()) > 1
        by_refit_error = self.importance in ORDERS_BY_REFIT_ERROR
        return "obs" if mixed and self.export_reform == "upstream" and not by_refit_error else "prefix"

    def export_calibration_spec(self) -> CalibrationSpec:
        """The windows the export's least squares fits on: ``export_calib``'s text (None: the statistics';
        auto: the statistics' text, with C4's calibration half beside the default WikiText-2 above
        MIXED_EXPORT_MIN_RATIO), the statistics' region and seed (each source's region: never the
        fitness's or the re-scoring's text)."""
        statistics = self.calibration_spec()
        text = self.export_calib or statistics.dataset
        if self.export_calib == "auto":
            mixed = self.calibration["dataset"] == "wikitext2" and self.ratio > MIXED_EXPORT_MIN_RATIO + 1e-9
            text = AUTO_EXPORT_CALIB if mixed else statistics.dataset
        return CalibrationSpec(text, self.export_nsamples or statistics.nsamples, statistics.seqlen, statistics.seed,
                               statistics.region, statistics.chat_template)

    def check(self) -> None:
        """Every mistake a user can make in a search's settings, as a :class:`UserError`."""
        if self.searcher not in SAMPLERS:
            raise UserError(f"unknown searcher {self.searcher!r}; known: {', '.join(SAMPLERS)}")
        if not 0 < self.ratio <= 1:
            raise UserError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio_min is not None and not 0 < self.ratio_min < self.ratio:
            raise UserError(f"--ratio-min must be in (0, ratio), got {self.ratio_min}")
        if self.multi_objective and self.ratio_min is None:
            raise UserError(f"searcher {self.searcher} searches a ratio range: give --ratio-min too")
        if self.trials < 1:
            raise UserError("--trials must be at least 1")
        if self.max_failures < 1:
            raise UserError("--max-failures must be at least 1")
        if self.order_seed not in (None, EVEN_WINDOWS) and not isinstance(self.order_seed, int):
            raise UserError(f"order_seed is a seed, {EVEN_WINDOWS!r} or unset, got {self.order_seed!r}")
        for name in ("export_nsamples", "order_nsamples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise UserError("--trial-timeout must be a positive number of seconds")
        if not isinstance(self.gpus_per_worker, int) or self.gpus_per_worker < 1:  # a config file may hold anything
            raise UserError(f"--gpus-per-worker must be a whole number of GPUs, at least 1 (got {self.gpus_per_worker!r})")
        if self.gpus_per_worker > 1 and self.solver_device == "model" and self.fitness_reform == "lstsq":
            # the solvers are formed on the first GPU as the preparation streams the blocks through it
            raise UserError("a worker over several GPUs keeps the fitness's least-squares state in host memory: "
                            "give --solver-device cpu (or --fitness-reform none)")
        if self.final_top_k < 1:
            raise UserError("--final-top-k must be at least 1 (the candidates re-scored at the end)")
        if self.eval_windows is not None and self.eval_windows < 0:
            raise UserError("--eval-windows must be 0 (no test) or more")
        if self.mlp_step is not None and self.mlp_step < 1:
            raise UserError("--mlp-step must be at least 1")
        self.check_fitness()
        if self.pruner not in ("none", "median"):
            raise UserError("--pruner must be none or median")
        if self.preset not in WIDTH_PRESETS:
            raise UserError(f"unknown width preset {self.preset!r}; known: {', '.join(WIDTH_PRESETS)}")
        if self.evolution not in EVOLUTION_PRESETS and self.evolution not in STAGED_PRESETS:
            known = ", ".join([*EVOLUTION_PRESETS, *STAGED_PRESETS])
            raise UserError(f"unknown evolution preset {self.evolution!r}; known: {known}")
        if self.staged is not None:
            self.check_staged()
        elif self.preset == "depth":
            raise UserError("--preset depth (whole sub-layers) is searched by --evolution staged: its level switches "
                            "drop one sub-layer and restore another; the other searchers project onto the budget")
        for name, known in (("dtype", DTYPES), ("pass_dtype", PASS_DTYPES), ("solver_dtype", ("auto", *DTYPES)),
                            ("solver_device", SOLVER_DEVICES)):
            if getattr(self, name) not in known:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(known)}")
        if self.export_reform not in MODES:
            raise UserError(f"--export-reform must be one of {', '.join(MODES)}")
        self.export_spec()  # the export's settings go together (pass dtype and selection: upstream mode)
        self.export_calibration_spec()  # an unknown source or file
        score_spec(self.importance)
        self.check_regions()
        if self.eval_windows != 0 and "wikitext2" not in {parse_dataset(d)[0] for d in self.eval_datasets}:
            raise UserError("the export's evaluation needs wikitext2 among --eval-datasets (the headline number)")

    def check_fitness(self) -> None:
        if self.fitness_reform not in ("lstsq", "none"):
            raise UserError("--fitness-reform must be lstsq or none")
        if self.fitness_statistics not in ("dense", "upstream"):
            raise UserError("--fitness-statistics must be dense or upstream")
        if self.fitness_statistics == "upstream" and self.fitness_reform != "lstsq":
            raise UserError("--fitness-statistics upstream is what the fitness's least squares fits on: "
                            "it needs --fitness-reform lstsq")
        if self.fitness not in FITNESS_KINDS:
            raise UserError(f"--fitness must be one of {', '.join(FITNESS_KINDS)}")
        if self.fitness_top_k < 1:
            raise UserError("--fitness-top-k must be at least 1")

    def check_staged(self) -> None:
        pool = self.calibration_spec("fitness_windows").nsamples
        if pool < max(self.staged.windows):
            raise UserError(f"--evolution {self.evolution} scores its last stage on {max(self.staged.windows)} "
                            f"fitness windows: give --fitness-nsamples at least that (got {pool})")
        if self.pruner != "none":
            raise UserError("--pruner applies to the other searchers: staged evolution stops weak children itself")

    def check_regions(self) -> None:
        """The statistics, fitness and re-scoring windows must come from disjoint text."""
        specs = {name: self.calibration_spec(name) for name in WINDOW_SETS}
        names = list(specs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if specs[a].overlaps(specs[b]):
                    raise UserError(f"the {a} and {b} of a search are drawn from overlapping text "
                                    f"({specs[a].to_dict()} and {specs[b].to_dict()}); give them disjoint regions")
