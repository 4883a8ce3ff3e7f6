"""`protege scaling --config scaling.yaml`: the IsoFLOP experiment (see `protege.scaling`)."""

from __future__ import annotations


from . import Subparsers, add_stage_parser

ORDER = 72


def register(sub: Subparsers) -> None:
    add_stage_parser(sub, "scaling", "scaling")
