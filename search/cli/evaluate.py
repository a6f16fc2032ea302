"""``llm-pruner eval``: perplexity and zero-shot scores of a model or an export."""

from __future__ import annotations

from pathlib import Path

from evaluators.suite import eval_table, evaluate
from evaluators.harness import parse_tasks
from search.cli import common
from space.errors import UserError
from space.export import write_json
from space.models import load_model, resolve


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or export")
    p.add_argument("model", help="HF folder (exports of ours included), hub id, .gguf file, or alias")
    p.add_argument("--ppl", type=common.ppl_list, default=["wikitext2"],
                   help="datasets, e.g. wikitext2,ptb,c4:heldout; 'none' for no perplexity")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit-windows", type=int, help="only the first N windows of each dataset")
    p.add_argument("--batch-size", type=common.positive_int, default=1)
    p.add_argument("--zeroshot", help="zero-shot tasks scored by lm-evaluation-harness, comma-separated: all (the "
                                      "seven of the papers, from the local files), any of them, or any lm-eval "
                                      "task or group name (its data from the HF cache or the network)")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N examples of each task")
    p.add_argument("--zeroshot-batch-size", type=common.positive_int, default=16)
    p.add_argument("--json", type=Path, help="write the result here")
    common.add_model_options(p)
    p.set_defaults(validate=validate, main=main)


def validate(args) -> None:
    if args.seqlen < 2:
        raise UserError("--seqlen must be at least 2")
    if args.limit_windows is not None and args.limit_windows < 1:
        raise UserError("--limit-windows must be at least 1")
    if args.json is not None and not args.json.parent.exists():
        raise UserError(f"cannot write {args.json}: its folder does not exist")
    if args.zeroshot is not None:
        args.zeroshot = parse_tasks(args.zeroshot)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if not args.ppl and not args.zeroshot:
        raise UserError("nothing to evaluate: give --ppl datasets or --zeroshot tasks")
    resolve(args.model)


def evaluate_path(spec: str, *, dtype: str, device: str, quiet: bool, trust_remote_code: bool = False,
                  **options) -> dict:
    """:func:`evaluators.evaluate` of the model ``spec`` names, loaded in ``dtype`` on ``device``;
    the record says which model it was."""
    loaded = load_model(spec, dtype=common.DTYPES[dtype], device=device, trust_remote_code=trust_remote_code)
    result = evaluate(loaded.model, loaded.tokenizer, progress=None if quiet else common.progress(False), **options)
    return {"model": loaded.source.to_dict(), **result}


def main(args) -> int:
    result = evaluate_path(args.model, dtype=args.dtype, device=args.device, quiet=args.quiet,
                           trust_remote_code=args.trust_remote_code, ppl=args.ppl, seqlen=args.seqlen,
                           limit=args.limit_windows, batch_size=args.batch_size, zeroshot=args.zeroshot,
                           zeroshot_limit=args.limit, zeroshot_batch_size=args.zeroshot_batch_size)
    print(eval_table(result))
    if args.json is not None:
        write_json(args.json, result)
    return 0
