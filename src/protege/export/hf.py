"""A model, an adapter or a training run -> one self-contained HF folder (merged in fp32).

The folder is what every downstream tool reads: safetensors weights, the tokenizer with the chat
template it was trained with, a `generation_config.json` whose stop ids include the chat format's
end-of-turn token (otherwise `generate()` and most servers stop only at EOS and run past the turn),
and a model card (README.md) that says where the model came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import StageError
from ..outputs import MANIFEST

if TYPE_CHECKING:
    from ..chat import ChatFormat

__all__ = ["resolve_source", "save_hf", "SUPPORTED_ARCHITECTURES"]

# Families whose export protege checks end to end (GGUF conversion, llama.cpp round trip).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
                           "MistralForCausalLM")


def resolve_source(spec: str) -> tuple[str, Path | None]:
    """(what to load, the training run folder if `spec` is one).

    A run folder (an SFT/DPO output with `adapter/` or `model/`) exports its adapter merged into the
    base; an adapter folder whose base model is missing is an error naming the path it looked for.
    """
    p = Path(spec)
    run = None
    if p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        for sub in ("adapter", "model", "merged"):
            if (p / sub).is_dir():
                run, p = Path(spec), p / sub
                break
        else:
            raise StageError(f"{spec}: neither a model folder (config.json), an adapter (adapter_config.json) nor "
                             "a training run (adapter/ or model/ inside)")
    adapter_cfg = p / "adapter_config.json"
    if adapter_cfg.is_file():
        base = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        base_path = Path(base)
        looks_local = base.startswith(("/", ".", "~")) or base.count("/") != 1
        if looks_local and not base_path.exists():
            from ..models import ALIASES

            if base not in ALIASES:
                raise StageError(f"adapter {p}: its base model {base!r} (adapter_config.json "
                                 "base_model_name_or_path) was not found; pull or restore it there, or edit that field")
    return (str(p) if p.exists() else spec), run


def _card(name: str, source: str, run: Path | None, base: str, chat: ChatFormat, extra: dict[str, Any]) -> str:
    lines = [f"# {name}", "", f"Exported by protege from `{source}`.", "",
             "| | |", "|---|---|", f"| base model | `{base}` |", f"| chat format | {chat.name} |",
             f"| end-of-turn ids | {chat.stop_token_ids} |"]
    for k, v in extra.items():
        lines.append(f"| {k} | {v} |")
    if run is not None:
        manifest = run / MANIFEST
        if manifest.is_file():
            m = json.loads(manifest.read_text(encoding="utf-8"))
            lines += ["", "## Training", "", f"stage `{m.get('stage')}`, finished {m.get('finished_at')}, "
                      f"{m.get('seconds')} s; counts: {json.dumps(m.get('counts', {}))}", ""]
            for inp in m.get("inputs", []):
                data_manifest = Path(inp["path"]).parent / MANIFEST
                line = f"- data `{inp['path']}` (sha256 {inp['sha256'][:12]})"
                if data_manifest.is_file():
                    dm = json.loads(data_manifest.read_text(encoding="utf-8"))
                    line += f": {dm.get('stage')} {json.dumps(dm.get('counts', {}))}"
                lines.append(line)
            cfg = m.get("config") or {}
            lines += ["", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```"]
        for results in sorted(run.parent.glob("*/results.json"))[:4]:  # bench results of the same recipe run
            try:
                r = json.loads(results.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            scores = {k: v.get("score") for k, v in r.items() if isinstance(v, dict) and "score" in v}
            if scores:
                lines += ["", f"Evaluation ({results.parent.name}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())]
    return "\n".join(lines) + "\n"


def save_hf(spec: str, out: Path, name: str | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Merge (fp32) and save `spec` as an HF folder in `out` (named `name` in its model card, default the
    folder's name); return (model, tokenizer, chat format, info)."""
    from ..chat import ChatFormat, write_chat_meta
    from ..models import load

    source, run = resolve_source(spec)
    model, tok = load(source, dtype="float32", device="cpu")  # adapters (incl. token rows) merged in fp32
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StageError(f"{spec}: architecture {arch} is not one protege exports (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    chat = ChatFormat.from_tokenizer(tok)
    chat.apply_to(tok)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = list(dict.fromkeys(chat.stop_token_ids))
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    write_chat_meta(out, chat.marker)  # a Koala-style model keeps its inference marker (serve reads the hf/ folder)
    base = source
    adapter_cfg = Path(source) / "adapter_config.json"
    if adapter_cfg.is_file():
        base = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or source
    info = {"architecture": arch, "parameters": sum(p.numel() for p in model.parameters()), "base": base,
            "source": spec, "run": str(run) if run else None}
    (out / "README.md").write_text(_card(name or out.name, spec, run, base, chat,
                                         {"architecture": arch, "parameters": f"{info['parameters']:,}"}),
                                   encoding="utf-8")
    return model, tok, chat, info
