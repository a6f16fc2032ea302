"""What the subcommands share: dtype names, option groups, argument types, progress bars."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml

from evaluators.data import CalibrationSpec, parse_dataset
from reform.lstsq import RIDGES
from reform.spec import DEFAULT_METHOD, DEFAULT_MODE, METHODS, MODES, ReformSpec, method_spec
from space.errors import UserError
from space.models import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFORM_NSAMPLES = 128  # calibration windows of the reformation (the paper's count)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own code to run")


CALIB_HELP = ("calibration text (never a test split): wikitext2 | ptb | c4:calib (a built-in dataset[:split]), "
              "a text file, FILE.jsonl:FIELD, hf:NAME[:CONFIG]:SPLIT:FIELD or hf:FOLDER[:SPLIT]:FIELD (any dataset "
              "the datasets library opens, a save_to_disk folder), several joined by + (default wikitext2)")
CHAT_TEMPLATE_HELP = ("wrap each calibration document (a JSONL record, a dataset row, a paragraph) in the model's "
                      "chat template, as one user message or, for a field of role/content messages, as that "
                      "conversation (for instruct models)")


def add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    """``--calib`` and ``--chat-template``."""
    parser.add_argument("--calib", default="wikitext2", help=CALIB_HELP)
    parser.add_argument("--chat-template", action="store_true", help=CHAT_TEMPLATE_HELP)


def add_calibration_options(parser: argparse.ArgumentParser, *, nsamples: int = 64) -> None:
    add_calibration_flags(parser)
    parser.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="calibration batch size")


def calibration_from(args, nsamples: int | None = None, *, model: str | None = None) -> CalibrationSpec:
    """The calibration the options name; its text is read now, so a missing or test split fails
    before any model loads, and with ``model`` (a checked spec) its tokens are counted with the
    model's tokenizer where that loads alone (:func:`model_tokenizer`)."""
    spec = CalibrationSpec(args.calib, nsamples or args.nsamples, args.calib_seqlen, args.seed,
                           chat_template=args.chat_template)
    spec.check_text(model_tokenizer(model) if model else None)
    return spec


def model_tokenizer(model: str):
    """The tokenizer of a model folder, without its weights; None for a GGUF file or a hub id (their
    tokenizer comes with the model) or when it does not load alone (the model's load says why)."""
    source = resolve(model)
    if source.kind != "folder":
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception:  # remote code, a broken folder: loading the model reports it with its message
        return None


def add_reform_options(parser: argparse.ArgumentParser, *, method_flag: str, mode_flag: str) -> None:
    defaults = ReformSpec()
    parser.add_argument(method_flag, dest="reform_method", choices=list(METHODS), default=DEFAULT_METHOD,
                        help="rectification of o_proj/down_proj: "
                             + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                             + f" (default {DEFAULT_METHOD})")
    parser.add_argument(mode_flag, dest="reform_mode", choices=list(MODES),
                        help="local: dense inputs; sequential: inputs from the pruned upstream model, dense "
                             "outputs as target; upstream: inputs from the pruned upstream model, the layer's own "
                             "dense weights as target "
                             f"(default {DEFAULT_MODE} where the method has it, else local)")
    parser.add_argument("--damping", type=float, default=defaults.damping,
                        help=f"least-squares ridge, relative to mean(diag XᵀX) (default {defaults.damping:g})")
    parser.add_argument("--ridge", choices=RIDGES, default=defaults.ridge,
                        help="what the least squares' ridge pulls toward: zero, or the dense kept weights "
                             f"(local and upstream modes; default {defaults.ridge})")
    parser.add_argument("--admm-rho", type=float, default=defaults.rho,
                        help=f"ADMM penalty, relative to mean(diag XᵀX) (default {defaults.rho:g})")
    parser.add_argument("--admm-iterations", type=int, default=defaults.iterations,
                        help=f"ADMM iterations (default {defaults.iterations})")


def reform_spec(args) -> ReformSpec:
    mode = args.reform_mode or (DEFAULT_MODE if method_spec(args.reform_method).sequential else "local")
    return ReformSpec(args.reform_method, mode, damping=args.damping, rho=args.admm_rho,
                      iterations=args.admm_iterations, ridge=args.ridge)


def ppl_list(text: str) -> list[str]:
    names = [t for t in (s.strip() for s in text.split(",")) if t and t != "none"]
    for name in names:
        try:
            parse_dataset(name)
        except UserError as exc:  # argparse turns only its own error types into a usage message
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return names


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def ratio(value: str) -> float:
    try:
        kept = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}")
    if not 0 < kept <= 1 or math.isnan(kept):
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1] (the kept fraction of block weights), got {value}")
    return kept


def progress(quiet: bool):
    from tqdm.auto import tqdm

    def wrap(iterable, **kwargs):
        return iterable if quiet else tqdm(iterable, leave=False, **kwargs)

    return wrap


def save_dtype(args) -> torch.dtype | None:
    return DTYPES[args.save_dtype] if args.save_dtype else None



def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A (sub)command's options by destination (what ``--config`` may set)."""
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config_file")}


def apply_config_file(args, actions: dict[str, argparse.Action], *, not_in_file: tuple[str, ...] = ()) -> None:
    """Fill the options not given on the command line from ``args.config_file`` (YAML: option
    names, with ``-`` or ``_``, to values, converted and checked as the flags are); the flags given
    win. Unknown names are a UserError."""
    path = args.config_file
    if path is None:
        return
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    known = sorted(set(actions) - set(not_in_file))
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must map options ({', '.join(known)}) to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for dest, value in values.items():
        action = actions[dest]
        if getattr(args, dest) != action.default or value is None:
            continue  # given on the command line
        if action.nargs == 0:  # a switch (store_true)
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {dest} is a switch: true or false, got {value!r}")
            setattr(args, dest, value)
            continue
        many = action.nargs not in (None, "?")  # a list option (nargs "+", "*", N)
        items = [_option_value(path, action, v) for v in (value if isinstance(value, list) else [value])] \
            if many else [_option_value(path, action, value)]
        setattr(args, dest, items if many else items[0])


def _option_value(path, action: argparse.Action, value):
    """One value of a --config file, converted and checked like the flag's."""
    if action.type is not None:
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # e.g. --eval a,b
        try:
            value = action.type(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"--config {path}: {action.dest}: {exc}") from exc
    if action.choices is not None and value not in action.choices:
        raise UserError(f"--config {path}: {action.dest} must be one of {', '.join(map(str, action.choices))}")
    return value


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with a ``--config FILE`` option added: a YAML file of the parser's options
    (:func:`apply_config_file`); the flags given override it. A bad file is a usage error (one
    message, exit status 2), as a bad flag is. The namespace holds the options only (no
    ``config_file``: what the file set is in it), as without ``--config``."""
    parser.add_argument("--config", dest="config_file", type=Path, metavar="FILE",
                        help="a YAML file of these options (option names to values; experiments/configs/ holds "
                             "those of the results tables); the flags given override it")
    args = parser.parse_args(argv)
    try:
        apply_config_file(args, option_actions(parser))
    except UserError as exc:
        parser.error(str(exc))
    del args.config_file
    return args


def exit_status(run, *args) -> int:
    """``run(*args)``'s status, a :class:`UserError` from it one message on stderr and status 2 (the
    experiment scripts' mains: what they measured before the error is already saved)."""
    try:
        return run(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
