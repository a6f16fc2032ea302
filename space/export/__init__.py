"""Exports: a subnet written as a Hugging Face folder that reloads with ``from_pretrained``
(:mod:`space.export.folder`), its config (:mod:`.config`), its state dict (:mod:`.state`), and
the atomic writes every result file goes through (:mod:`.atomic`), and the same export as one GGUF
file for llama.cpp (:mod:`.gguf`, ``llm-pruner export-gguf``)."""

from space.export.atomic import staged_folder, write_json
from space.export.folder import (
    SUBNET_FILE,
    check_destination,
    export_subnet,
    read_subnet_record,
    record_header,
    update_subnet_record,
)

__all__ = ["SUBNET_FILE", "check_destination", "export_subnet", "read_subnet_record", "record_header", "staged_folder",
           "update_subnet_record", "write_json"]
