"""What every generator shares: the run folder, the cached teacher, records out, the manifest.

Resuming works by *replay*: every teacher request is cached (teacher_cache.sqlite in
`out_dir`) and every random choice is seeded, so a rerun after a kill asks the same
questions in the same order, gets the finished ones back from the cache instantly,
and carries on where the killed run stopped. `records.jsonl` is rewritten from the
start on each run, so it never holds duplicates or half-written lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any


from ..config import Sampling, StageConfig, safe_yaml
from ..manifest import StageRun
from ..records import JsonlWriter
from ..teachers import Teacher, TeacherConfig, make_teacher

__all__ = ["GeneratorRun", "data_file", "read_yaml_data", "sampling", "clean_reply"]


def data_file(name: str) -> Path:
    """Path of a data file shipped in `protege/generate/data/`."""
    return Path(str(resources.files("protege.generate") / "data" / name))


def read_yaml_data(path: str | Path) -> Any:
    """A YAML data file (topics, system messages), alias bombs refused."""
    return safe_yaml(Path(path).read_text(encoding="utf-8"), str(path))


def sampling(s: Sampling, seed: int | None = None, stop: list[str] | None = None) -> Any:
    """Engine `SamplingParams` for a config's `Sampling` (imported here so `protege --help` does not load torch)."""
    from ..engine import SamplingParams

    return SamplingParams.from_config(s, seed, stop)


def clean_reply(text: str) -> str:
    """A teacher's answer as a record's content: surrounding whitespace removed."""
    return text.strip()


class GeneratorRun(StageRun):
    """A generator's `StageRun`: its folder also holds the cached teacher and a fresh records.jsonl."""

    def __init__(self, stage: str, config: StageConfig, out_dir: str | Path, teacher_config: TeacherConfig | None = None,
                 records_name: str = "records.jsonl"):
        super().__init__(stage, config, out_dir)
        self.teacher: Teacher | None = make_teacher(teacher_config, self.out_dir) if teacher_config else None
        self.records_path = self.out_dir / records_name
        self.writer = JsonlWriter(self.records_path)

    @property
    def out_dir(self) -> Path:
        """The stage folder (`StageRun.out`), under the name the generators use."""
        return self.out

    def teacher_counts(self, teacher: Teacher | None = None) -> dict[str, int]:
        t = teacher or self.teacher
        keys = ("requests", "cache_hits", "sent", "deduplicated", "retries", "prompt_tokens", "completion_tokens")
        return {k: int(t.stats.get(k, 0)) for k in keys} if t is not None else {}

    def finish(self, counts: dict[str, Any], seconds: float, inputs: list[str | Path] | None = None,  # type: ignore[override]
               outputs: list[str | Path] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.writer.close()
        if self.teacher is not None:
            extra = {"teacher": self.teacher.name, **(extra or {})}
            self.teacher.close()
        super().finish(outputs or [self.records_path], counts, inputs=inputs, extra=extra, seconds=seconds)

    def abort(self) -> None:
        self.writer.close()
        if self.teacher is not None:
            self.teacher.close()

    @contextmanager
    def progress(self, total: int, desc: str, unit: str, show: bool = True) -> Iterator[Any]:
        """The body of a run: yields a tqdm bar over `total` units, or None when `show` is off.

        Any exception in the body, KeyboardInterrupt included, aborts the run (closes
        records.jsonl and the teacher) before it propagates; the bar is always closed.
        """
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        try:
            yield bar
        except BaseException:
            self.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
