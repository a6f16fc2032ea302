"""The defaults of the day for a new search (:meth:`search.config.SearchConfig.create`, the command line, a
config file's missing keys), each with the measurement that chose it: on PTB validation and the re-scoring
region, never a test split (experiments/results/quality.md). The dataclass's own field defaults stay what a
run folder made before each field existed meant (:func:`search.rundir.open_run_dir`)."""

from __future__ import annotations

from evaluators.environment import fast_bfloat16

# The KL fitness; selection in stages with level switches, ``staged-8`` (the last stage on 8 windows, 340 children:
# against ``staged``'s 16 windows and 260 children, the same window evaluations, PTB validation -2.4 to -2.9 % at
# 0.5 and -1.0 % at 0.7, re-scored KL lower too, two seeds each); the winner refitted on the pruned upstream model's
# statistics over 256 windows (64 for the search's own statistics; PTB validation -2.1 % at 0.7, -3.3 % at 0.5,
# experiments/results/calibration_size.md), its calibration passes in bfloat16 (the same perplexities to 0.03 % at
# both ratios, 44 % less time at 0.7); the unit order by ratio: ``osscar`` up to ORDER_SWITCH_RATIO, ``wanda-sp``
# above it (PTB-validation perplexity of the same search, osscar vs wanda-sp: 151.7 vs 202.3 at 0.5, 112.4 vs
# 122.8 at 0.6, 97.0 vs 85.5 at 0.7). The dtypes (``auto``: :func:`default_dtype`) are
# bfloat16 where its matmuls are fast, float32 elsewhere.
RECOMMENDED = {"fitness": "kl", "evolution": "staged-8", "export_reform": "upstream", "importance": "auto",
               "export_nsamples": 256, "export_pass_dtype": "auto", "export_select": "auto", "export_calib": "auto",
               "export_ridge": "zero", "dtype": "auto", "pass_dtype": "float32"}
PLAIN_TRIALS = 100
ORDER_SWITCH_RATIO = 0.6
# export_calib auto: with the default statistics' text (WikiText-2), the export also fits on C4's calibration
# half above MIXED_EXPORT_MIN_RATIO: PTB validation of the final row's winner refitted on 256 windows of
# both, against WikiText-2 alone, -3.9 % at 0.7 (c4:heldout -10.9 %, WikiText-2 +1.1 %) but +1.1 % at 0.5
# (experiments/results/calibration_size.md); at 0.6 a tie (+0.1 %, c4:heldout -11 %), so not there.
AUTO_EXPORT_CALIB = "wikitext2+c4:calib"
MIXED_EXPORT_MIN_RATIO = 0.6
ORDERS_BY_REFIT_ERROR = ("osscar", "obs-elimination", "ziplm")


def default_dtype(device: str) -> str:
    """The dtype ``auto`` stands for (candidates' scoring, the upstream export's passes) on ``device``:
    bfloat16 where its matmuls are faster than float32's (:func:`evaluators.environment.fast_bfloat16`:
    a GPU, a CPU that measures so: AVX-512 BF16, AMX), float32 on other CPUs (on an AVX2 EPYC a
    candidate scores 2.4x slower in bfloat16: experiments/results/scoring_dtype.md).
    Resolved when a search is created and recorded in its config, so a run resumes in the dtype it began
    with (on another machine too: ``--config RUN/config.yaml``)."""
    return "bfloat16" if fast_bfloat16(device) else "float32"


# The unit order's own windows (``order_nsamples``), by order: the osscar order on 256 windows of the statistics'
# region where the search's statistics are fewer (the fitness's least squares keeps their 64). Against the same
# search with the order on 64 (quality.md's order256 and last8 rows, three seeds each): at 0.6 PTB validation
# -4.3 / -10.7 / -14.2 % and every test text lower in every seed (means -3.8 / -9.8 / -3.7 % on WikiText-2 / PTB /
# c4:heldout); at 0.5 PTB validation -6.0 / -5.0 / -1.3 %, WikiText-2 and PTB lower in every seed, c4:heldout
# -0.2 / +3.5 / -5.5 % (means -1.3 / -3.4 / -0.8 %); the zero-shot level (0.6, 0.5). It costs the order's passes on
# four times the tokens (at 0.5 the preparation 1302 s, with another job beside it for part of it, against 256 s
# on a 2-core EPYC). The other orders take the statistics' count.
ORDER_NSAMPLES = {"osscar": 256}


def default_order_nsamples(importance: str, nsamples: int) -> int | None:
    """The windows the unit order ``importance`` is computed on by default when the statistics take
    ``nsamples`` (None: the statistics' own, as a config with no ``order_nsamples`` means)."""
    wanted = ORDER_NSAMPLES.get(importance)
    return wanted if wanted is not None and wanted > nsamples else None


def default_importance(ratio: float) -> str:
    """The unit order ``importance="auto"`` stands for at this ratio."""
    return "osscar" if ratio <= ORDER_SWITCH_RATIO + 1e-9 else "wanda-sp"

