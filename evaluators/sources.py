"""Calibration text of the user's own, recorded so that other data never passes for the same:

* a text file (``PATH``) or a field of a JSONL file (``PATH.jsonl:FIELD``), recorded as
  ``file:/absolute/path[:field]`` with a fingerprint of the content;
* any dataset the ``datasets`` library opens: ``hf:NAME[:CONFIG]:SPLIT:FIELD`` (``load_dataset``,
  a hub name) or ``hf:FOLDER[:SPLIT]:FIELD`` (``load_from_disk``, a ``save_to_disk`` folder; SPLIT
  when it holds a ``DatasetDict``), the folder recorded absolute with a fingerprint of its files;
* a ``datasets.Dataset`` handed to the Python API, recorded as ``memory:HASH:FIELD`` (a hash of the
  field's content; it lives in this process only).

Every record (a JSONL line, a dataset row) is one document; a field holding a conversation (a list
of ``{"role", "content"}`` messages) is one document too, its contents joined as plain text, or
rendered as it is by ``--chat-template`` (:func:`render_chat`), which makes any other document one
user message."""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

from evaluators.texts import paragraphs
from space.errors import UserError

FILE_SOURCE, HF_SOURCE, MEMORY_SOURCE = "file:", "hf:", "memory:"
HELD_OUT_SPLITS = ("test", "heldout")  # never calibrated on
HF_FORMS = "hf:NAME[:CONFIG]:SPLIT:FIELD (a hub dataset) or hf:FOLDER[:SPLIT]:FIELD (a save_to_disk folder)"
_MEMORY: dict[str, object] = {}  # memory:HASH:FIELD -> the datasets.Dataset


def refuse_held_out(split: str | None, what: str = "") -> None:
    """A test split (``test``, ``test[:100]``, c4's ``heldout``) is never calibrated on."""
    if split and split.split("[")[0].strip() in HELD_OUT_SPLITS:
        raise UserError(f"calibration on the {split} split{what} would leak into the evaluation; use validation, "
                        "train or c4's calib")


def own_source(spec: str) -> str | None:
    """``spec`` as recorded if it names data of the user's own (``hf:``, ``memory:``, a file), None if
    it names something else (a built-in dataset); a missing file or folder is refused."""
    spec = spec.strip()
    if spec.startswith(HF_SOURCE):
        return hf_source(spec)
    if spec.startswith(MEMORY_SOURCE):
        memory_dataset(spec)
        return spec
    return file_source(spec)


def file_source(spec: str) -> str | None:
    """``spec`` as a file source if it names a file (``PATH`` or ``PATH.jsonl:FIELD``, ``file:`` optional),
    None if it names something else (a built-in dataset); a missing file is refused."""
    raw = spec.strip().removeprefix(FILE_SOURCE)
    candidates = [(raw, "")] + ([tuple(raw.rsplit(":", 1))] if ":" in raw else [])
    for candidate, field in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            path = path.resolve()
            if path.suffix == ".jsonl" and not field:
                raise UserError(f"calibration file {path} is JSONL: name its text field, e.g. {path}:text")
            return f"{FILE_SOURCE}{path}" + (f":{field}" if field else "")
    looks_like_file = spec.strip().startswith(FILE_SOURCE) or "/" in raw or \
        raw.split(":")[0].endswith((".txt", ".jsonl", ".md"))
    if looks_like_file:
        raise UserError(f"calibration file not found: {raw}")
    return None


def hf_fields(source: str) -> list[str]:
    """The fields of an ``hf:`` spec, split at the colons outside brackets (``train[:100]``)."""
    return re.split(r":(?![^\[]*\])", source.strip().removeprefix(HF_SOURCE))


def hf_source(spec: str) -> str:
    """An ``hf:`` spec as recorded (a folder made absolute); its form and split checked."""
    fields = hf_fields(spec)
    folder = Path(fields[0]).expanduser()
    if folder.is_dir():
        fields[0], counts, split = str(folder.resolve()), (2, 3), fields[1] if len(fields) == 3 else None
    elif fields[0].startswith(("/", ".", "~")):
        raise UserError(f"calibration dataset folder not found: {fields[0]}")
    else:
        counts, split = (3, 4), fields[-2]
    if len(fields) not in counts or not all(f.strip() for f in fields):
        raise UserError(f"calibration source {spec!r}: write {HF_FORMS}")
    refuse_held_out(split)
    return HF_SOURCE + ":".join(fields)


def open_hf(source: str):
    """The ``datasets.Dataset`` of an ``hf:`` source, and its field."""
    import datasets

    fields = hf_fields(source)
    name, field = fields[0], fields[-1]
    if Path(name).is_dir():
        found = datasets.load_from_disk(name)
        split = fields[1] if len(fields) == 3 else None
        if isinstance(found, datasets.DatasetDict) != (split is not None):
            holds = f"the splits {', '.join(found)}" if isinstance(found, datasets.DatasetDict) else "one dataset"
            raise UserError(f"{name} holds {holds}: write hf:{name}:{'SPLIT:' if split is None else ''}{field}")
        if split is not None and split not in found:
            raise UserError(f"{name} has no split {split!r}; it has {', '.join(found)}")
        return (found[split] if split is not None else found), field
    try:
        return datasets.load_dataset(name, *fields[1:-2], split=fields[-2]), field
    except Exception as exc:  # datasets raises many types for "no network" / "no such dataset"
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"calibration source {source}: the datasets library could not open {name!r} "
                        f"(not a folder here either; {type(exc).__name__}: {message})") from exc


def column(dataset, field: str, where: str) -> list:
    """The values of ``field`` in ``dataset`` (a test split refused)."""
    refuse_held_out(str(dataset.split) if dataset.split is not None else None, f" of {where}")
    if field not in dataset.column_names:
        raise UserError(f"{where} has no field {field!r}; it has {', '.join(dataset.column_names)}")
    return list(dataset[field])


def register_dataset(dataset, field: str | None = None) -> str:
    """Keep a ``datasets.Dataset`` for calibration in this process; return its source,
    ``memory:HASH:FIELD`` (FIELD: ``field``, else its ``text`` column or its only column)."""
    names = getattr(dataset, "column_names", None)
    if not isinstance(names, list):
        hint = " (a DatasetDict: pick a split, data['train'])" if isinstance(names, dict) else ""
        raise UserError(f"calibration data is a dataset spec or a datasets.Dataset, not a {type(dataset).__name__}{hint}")
    if field is None:
        if "text" not in names and len(names) != 1:
            raise UserError(f"a calibration Dataset needs a 'text' column or one column; it has {', '.join(names)} "
                            "(pick one: dataset.select_columns([NAME]))")
        field = "text" if "text" in names else names[0]
    h = hashlib.sha1()
    for value in column(dataset, field, "the calibration Dataset"):
        h.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\0")
    source = f"{MEMORY_SOURCE}{h.hexdigest()[:16]}:{field}"
    _MEMORY[source] = dataset
    return source


def memory_dataset(source: str):
    if source not in _MEMORY:
        raise UserError(f"calibration source {source} is a datasets.Dataset another process was handed; this one "
                        "cannot see it (save_to_disk it and calibrate on hf:FOLDER:FIELD)")
    return _MEMORY[source]


def file_parts(source: str) -> tuple[Path, str]:
    """(path, field) of a file source; field "" for a plain text file."""
    raw = source.removeprefix(FILE_SOURCE)
    path, field = (raw.rsplit(":", 1) if ".jsonl:" in raw else (raw, ""))
    return Path(path), field


def own_documents(source: str) -> list:
    """The documents of a recorded source: records, rows, or a text file's paragraphs."""
    if source.startswith(HF_SOURCE):
        dataset, field = open_hf(source)
        return column(dataset, field, source)
    if source.startswith(MEMORY_SOURCE):
        return column(memory_dataset(source), source.rsplit(":", 1)[1], source)
    path, field = file_parts(source)
    if not field:
        return paragraphs(path.read_text(encoding="utf-8"))
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            if field not in record:
                raise UserError(f"{path} line {number} has no field {field!r}")
            documents.append(record[field])
    return documents


def is_conversation(document) -> bool:
    return isinstance(document, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in document)


def own_text(source: str) -> str:
    """The text of a recorded source: a text file as it is, documents joined by blank lines."""
    path, field = file_parts(source) if source.startswith(FILE_SOURCE) else (None, None)
    if path is not None and not field:
        return path.read_text(encoding="utf-8")
    return "\n\n".join("\n\n".join(str(m["content"]) for m in doc) if is_conversation(doc) else str(doc)
                       for doc in own_documents(source))


def render_chat(tokenizer, documents: list) -> str:
    """``documents`` through the tokenizer's chat template, one conversation each (a document that
    is not a conversation is one user message), concatenated."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template: the model's tokenizer has no chat template (a base model?); "
                        "calibrate without it, or on the instruct model")
    conversations = [doc if is_conversation(doc) else [{"role": "user", "content": str(doc)}] for doc in documents]
    try:
        return "".join(tokenizer.apply_chat_template(conversations, tokenize=False))
    except Exception as exc:  # a template may raise on roles it does not know (jinja's own errors)
        raise UserError(f"--chat-template: the model's chat template failed on the calibration text "
                        f"({type(exc).__name__}: {exc})") from exc


def fingerprint(source: str) -> str | None:
    """A short hash of the content of a file or dataset folder source (cached by path, size and
    modification time); None for any other source."""
    if source.startswith(FILE_SOURCE):
        path = file_parts(source)[0]
        stat = path.stat()
        return _digest(str(path), stat.st_size, stat.st_mtime_ns)
    folder = Path(hf_fields(source)[0]) if source.startswith(HF_SOURCE) else None
    if folder is None or not folder.is_dir():
        return None
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}:{_digest(str(path), stat.st_size, stat.st_mtime_ns)}".encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
