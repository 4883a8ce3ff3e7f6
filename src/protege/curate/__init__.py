"""Curation: clean, split, deduplicate, language-filter, quality-filter, decontaminate, mix, tag — with a data card.

`run(CurateConfig(inputs=[...], out_dir=..., steps=[...]))` writes `records.jsonl`,
`removed.jsonl` (`{id, step, reason, detail, source}` for every record not kept),
`card.md`, `card.html`, `config.yaml` and `manifest.json` into `out_dir`.
"""

from .config import (CleanStep, CurateConfig, DecontaminateStep, DedupStep, LanguageStep, MixStep, QualityStep,
                     ScoreStep, SourceMix, SplitStep, TagStep)
from .pipeline import run

__all__ = ["CurateConfig", "run", "CleanStep", "SplitStep", "DedupStep", "LanguageStep", "QualityStep",
           "DecontaminateStep", "MixStep", "SourceMix", "TagStep", "ScoreStep"]
