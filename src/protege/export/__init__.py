"""`protege export MODEL_OR_RUN --out DIR [--gguf f16,q8_0,q4_0,q4_k_m]`: ship a model.

Writes into `out_dir`:
- `hf/`: the merged fp32 HF folder (safetensors, tokenizer + chat template, generation_config with
  the end-of-turn stop ids, README.md model card with provenance);
- `<name>-<type>.gguf` per requested type: F32/F16/BF16/Q8_0 by llama.cpp's converter, the others
  quantized from the F32 file by llama.cpp's quantizer;
- `verify.json` and `verify.md` (unless `verify: false`): greedy parity of the F16 (or first) file
  with protege's engine, the 3-turn template check, and per file size / perplexity / Δppl / tokens/s;
- `manifest.json`, last.

GGUF chat template and BOS: if the trained template renders `{{ bos_token }}` itself, the GGUF gets
the template without it and `add_bos_token = true`, so llama.cpp (which adds BOS when the file says
so) and every tool built on it see exactly one BOS — llama-cpp-python#1561 is what two look like.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from ..config import StageConfig
from ..files import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase
    from ..chat import ChatFormat

__all__ = ["ExportConfig", "run", "gguf_template"]


class ExportConfig(StageConfig):
    model: str = Field(..., description="alias, HF folder, adapter folder, or a training run folder (adapter/ inside)")
    out_dir: str = Field("runs/export", description="output folder (hf/, *.gguf, verify.json, manifest.json)")
    gguf: list[str] = Field(default_factory=list, description="GGUF types to write: f32, f16, bf16, q8_0, q4_0, q4_1, "
                                                           "q4_k_m, q5_k_m, q6_k (none: HF folder only)")
    name: str | None = Field(None, description="file name stem of the GGUF files (default: the out_dir name)")
    verify: bool = Field(True, description="run the llama.cpp checks (greedy parity, template, perplexity)")
    verify_prompts: int = Field(16, description="chat prompts in the greedy-parity check")
    verify_tokens: int = Field(32, description="greedy tokens compared per prompt")
    ppl_texts: str | None = Field(None, description="held-out JSONL ({text} or records) for perplexity; default: protege's seed tasks")
    ppl_n: int = Field(32, description="texts used for perplexity")
    threads: int | None = Field(None, description="llama.cpp threads (default: all cores)")

    @field_validator("gguf", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [str(v).lower() for v in value]

    @field_validator("gguf")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from .gguf import GGUF_TYPES

        bad = [v for v in value if v not in GGUF_TYPES]
        if bad:
            raise ValueError(f"unknown GGUF type {bad[0]!r}; expected some of {', '.join(GGUF_TYPES)}")
        return list(dict.fromkeys(value))


_BOS_AT_START = re.compile(r"^\s*\{\{-?\s*bos_token\s*-?\}\}")


def gguf_template(chat: ChatFormat) -> tuple[str, bool]:
    """(template for the GGUF, add_bos_token) such that llama.cpp's prompt == `chat.encode_prompt`."""
    template = chat.template
    bos = chat.tokenizer.bos_token_id
    probe = chat.encode_prompt([{"role": "user", "content": "hi"}])
    starts_with_bos = bos is not None and bool(probe) and probe[0] == bos
    if starts_with_bos and _BOS_AT_START.search(template):
        return _BOS_AT_START.sub("", template, count=1), True
    return template, False  # the template writes every special token itself (or the model has no BOS)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| file | type | size (MB) | ppl | Δppl vs HF fp32 | prompt tok/s | generate tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " **unusable**" if r.get("unusable") else ""
        lines.append(f"| {r['file']}{flag} | {r['type']} | {r['size_mb']:.1f} | {r.get('ppl', float('nan')):.3f} | "
                     f"{r.get('delta_ppl', float('nan')):+.3f} | {r.get('prompt_tok_s', 0):.0f} | "
                     f"{r.get('gen_tok_s', 0):.1f} |")
    return "\n".join(lines)


def run(config: ExportConfig) -> dict[str, Any]:
    """Export `config.model`; see the module docstring for what lands where."""
    from ..engine.gguf import require_llama_cpp
    from ..manifest import StageRun
    from .gguf import GGUF_TYPES, conversion_input, convert, quantize
    from .hf import save_hf

    if config.gguf:
        require_llama_cpp()  # fail before the merge, not after
    stage = StageRun("export", config, config.out_dir)
    out = stage.out
    hf_dir = out / "hf"
    # Written beside and swapped in: the model being exported may be this very folder (re-exporting
    # `ship/hf` into `ship` to add GGUF files), so nothing is removed until its replacement is complete.
    with atomic_dir(hf_dir, tmp=out / ".hf-partial") as partial:
        model, tok, chat, info = save_hf(config.model, partial, name=hf_dir.name)
    outputs: list[Path] = [hf_dir]
    files: dict[str, Path] = {}
    stem = config.name or out.resolve().name
    template, add_bos = gguf_template(chat)
    if config.gguf:
        view = conversion_input(hf_dir, out / ".convert-input", template, add_bos)
        try:
            need_f32 = any(GGUF_TYPES[t] == "quantize" for t in config.gguf) or "f32" in config.gguf
            if need_f32:
                files["f32"] = convert(view, out / f"{stem}-f32.gguf", "f32")
            for t in config.gguf:
                if t == "f32":
                    continue
                target = out / f"{stem}-{t}.gguf"
                files[t] = convert(view, target, t) if GGUF_TYPES[t] == "convert" else quantize(files["f32"], target, t, config.threads)
        finally:
            shutil.rmtree(out / ".convert-input", ignore_errors=True)
        if "f32" not in config.gguf and "f32" in files:
            files.pop("f32").unlink()
        outputs += list(files.values())
    report: dict[str, Any] = {"model": info, "files": {t: str(p) for t, p in files.items()}}
    if config.verify and files:
        report.update(_verify(config, model, tok, chat, files, add_bos))
        (out / "verify.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (out / "verify.md").write_text(_verify_markdown(report), encoding="utf-8")
        outputs += [out / "verify.json", out / "verify.md"]
    counts = {"gguf_files": len(files), "parameters": info["parameters"]}
    if "parity" in report:
        counts["greedy_equal"] = f"{report['parity']['equal']}/{report['parity']['prompts']}"
        counts["template_ok"] = report["template"]["ok"]
    stage.finish(inputs=[p for p in [config.model] if Path(p).exists()], outputs=outputs, counts=counts,
                 extra={"export": report})
    return {**counts, "out_dir": str(out)}


def _verify(config: ExportConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase, chat: ChatFormat, files: dict[str, Path],
            add_bos: bool) -> dict[str, Any]:
    from ..engine import Engine
    from ..engine.gguf import open_gguf
    from .verify import (decode_speed, greedy_parity, load_texts, perplexity_gguf, perplexity_hf,
                         template_check, _token_ids)

    ref_type = next((t for t in ("f32", "f16", "bf16", "q8_0") if t in files), next(iter(files)))
    engine = Engine(model, tok, chat)
    llm = open_gguf(files[ref_type], threads=config.threads)
    parity = greedy_parity(llm, engine, chat, config.verify_prompts, config.verify_tokens)
    template = template_check(llm, files[ref_type], chat)
    llm.close()
    texts = load_texts(config.ppl_texts, config.ppl_n)
    ids = _token_ids(tok, texts, add_bos, 512)
    ppl_ref = perplexity_hf(model, ids)
    rows = []
    prompt = chat.encode_prompt([{"role": "user", "content": VERIFY_SPEED_PROMPT}])
    for t, path in files.items():
        llm = open_gguf(path, threads=config.threads, logits_all=True)
        ppl, prompt_speed = perplexity_gguf(llm, ids)
        llm.close()
        fast = open_gguf(path, threads=config.threads)  # without logits_all: what a user's decode runs at
        rows.append({"type": t, "file": path.name, "size_mb": path.stat().st_size / 2**20, "ppl": ppl,
                     "delta_ppl": ppl - ppl_ref, "prompt_tok_s": prompt_speed, "gen_tok_s": decode_speed(fast, prompt),
                     "unusable": ppl > 1.5 * ppl_ref})
        fast.close()
        if rows[-1]["unusable"]:
            # Measured: Q4_0 of a LoRA-SFT gemma-3-270m went from ppl 20.2 to 2,279 while Q4_1 gave 25.1.
            print(f"[export] WARNING: {path.name} is unusable: perplexity {ppl:.1f} vs {ppl_ref:.1f} for the fp32 "
                  "model; try another type (q4_1, q4_k_m, q8_0)", file=sys.stderr, flush=True)
    return {"parity": {**parity, "reference_file": files[ref_type].name}, "template": template,
            "perplexity": {"texts": len(ids), "tokens": sum(len(s) for s in ids), "hf_fp32": ppl_ref, "rows": rows}}


VERIFY_SPEED_PROMPT = "Write a short paragraph about the sea."


def _verify_markdown(report: dict[str, Any]) -> str:
    p, t, q = report["parity"], report["template"], report["perplexity"]
    return "\n".join([
        f"# Export check: {report['model']['source']}", "",
        f"Greedy parity ({p['reference_file']} in llama.cpp vs protege's engine on the fp32 HF folder): "
        f"{p['equal']}/{p['prompts']} prompts equal over the first {p['tokens']} tokens"
        + ("." if p.get("max_margin_at_divergence") is None else
           f"; where they differ, the fp32 model's logit margin between the two choices was at most "
           f"{p['max_margin_at_divergence']:.4f} (a near-tie that F16 rounding flips)."), "",
        f"Template: llama.cpp's prompt for a 3-turn conversation {'equals' if t['ok'] else 'DIFFERS from'} "
        f"ChatFormat's ({t.get('expected_tokens')} tokens; add_bos_token {t.get('add_bos_token')}, double BOS "
        f"{t.get('double_bos')}); generation stops at end of turn: {t.get('stops_at_end_of_turn')}.", "",
        f"Perplexity on {q['texts']} held-out texts ({q['tokens']} tokens): HF fp32 {q['hf_fp32']:.3f}.", "",
        _table(q["rows"]), ""])
