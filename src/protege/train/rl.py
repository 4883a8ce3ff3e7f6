"""What every reward-optimising method shares (GRPO, PPO, rejection sampling): rollouts from protege's
own engine, their cache, per-token log-probs of the sampled answers under the policy and the reference,
and the over-optimisation watch.

- Rollouts: the policy's current weights decode through the rollout engine (`rollout_engines`: protege's
  `engine.Engine` on the live adapters by default, or vLLM with the weights pushed after each step), each
  sample with its own seed derived from (run seed, micro-batch, sample), so
  the same weights give the same answers. Each micro-batch's rollouts are written to
  `rollouts/mb-NNNNNN.json` before its loss is computed: a run killed mid-step resumes from its last
  checkpoint, finds the rollouts of the step it was in (they came from the very weights it resumes
  with) and reuses them instead of decoding them again.
- Reference: the policy with its LoRA adapters disabled (PEFT `disable_adapter`), no second copy.
- Over-optimisation, always on: every held-out evaluation scores greedy answers with the *proxy*
  reward the run optimises and with a *gold* scorer it never trains on, and estimates KL(policy ||
  reference) in nats per answer from sampled answers. `OverOptimisationWatch` keeps the history,
  warns when gold fell for two evaluations in a row while the proxy rose (Gao et al. 2022), and
  saves the best model by gold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from pydantic import Field

from ..config import Sampling, sampling_field
from ..files import atomic_write_json
from .data import Example, collate
from .losses import IGNORE_INDEX
from .pair_data import scored_positions
from .rewards import PromptItem, Reward, RewardConfig, RewardSpec
from .rollout_engines import RolloutEngine, RolloutEngineConfig
from .settings import LoraSettings, Schedule, TrainSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from accelerate import Accelerator
    from ..chat import ChatFormat
    from .fit import RunContext

__all__ = ["RolloutSettings", "RLSettings", "Rollout", "RolloutCache", "sample_rollouts", "rollout_batch", "reference_off",
           "sampler_correction",
           "OverOptimisationWatch", "sample_seed", "split_prompts", "policy_eval", "score_rollouts", "token_kl",
           "make_rewards", "watched_fit", "rl_summary", "prompt_plan", "eval_plan", "load_policy",
           "save_policy"]

OVEROPTIMISATION_FILE = "overoptimisation.json"  # read by the report


class RolloutSettings(TrainSettings):
    """What GRPO, PPO and rejection sampling share: the policy, its prompts and rewards, and how it samples."""

    model: str = Field(..., description="the policy to start from (usually the SFT student's merged folder)")
    prompts: str = Field(..., description="training prompts: JSONL ({prompt, gold?} / {messages}) or task:<name>")
    eval_prompts: str | None = Field(None, description="held-out prompts (default: split off eval_fraction of `prompts`)")
    eval_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="share of `prompts` held out when eval_prompts is unset")
    reward: RewardSpec = Field(default_factory=RewardConfig, description="the proxy reward the run optimises "
                               "(or a list of weighted terms, summed)")
    gold: RewardSpec | None = Field(None, description="held-out gold scorer for the over-optimisation watch "
                                      "(default: the reward itself when it is a rule, which then measures success)")
    sampling: Sampling = sampling_field("how rollouts are sampled (held-out evals are greedy too)", max_new_tokens=64,
                                        temperature=1.0)
    max_length: int = Field(512, ge=2, description="prompt tokens kept (from the end) + sampling.max_new_tokens")
    eval_max_examples: int = Field(64, ge=0, description="cap on held-out prompts")
    engine_batch: int = Field(32, ge=1, description="rollouts decoded together by the engine")
    rollout: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig,
                                         description="who decodes the rollouts (protege's engine, vLLM in-process, a "
                                         "vLLM server) and the importance-sampling correction of vLLM's log-probs")
    merge_for_rollouts: bool = Field(True, description="fold the LoRA adapters into the weights while decoding "
                                     "rollouts (restored bit-exactly after; costs one copy of the adapted weights)")

    @property
    def score_temperature(self) -> float:
        """The temperature rollouts are scored at: the one they were sampled at, 1 for greedy (0) rollouts."""
        return self.sampling.temperature or 1.0

    @property
    def max_prompt(self) -> int:
        """Prompt tokens kept (from the end) so that prompt + answer fit `max_length`."""
        return max(1, self.max_length - self.sampling.max_new_tokens)


class RLSettings(RolloutSettings):
    """GRPO and PPO: online RL against a KL penalty, with online RL's optimizer defaults (small constant LR,
    frequent held-out evals, LoRA without dropout)."""

    kl_estimator: Literal["k1", "k3"] = Field("k3", description="per-token KL estimate: k1 (logp - ref) or k3")
    beta: float = Field(0.0, ge=0.0, description="KL penalty coefficient")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(dropout=0.0),
                               description="LoRA settings; dropout 0 so rollout and training log-probs agree")
    learning_rate: float = Field(2e-5, gt=0.0, description="peak learning rate")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="fraction of steps of linear warmup")
    schedule: Schedule = Field("constant", description="LR decay after warmup")
    eval_every: int = Field(5, ge=0, description="held-out eval (proxy, gold, KL) every N steps, and at the end")
    save_every: int = Field(5, ge=0, description="checkpoint every N optimizer steps (and always at the end)")


@dataclass
class Rollout:
    prompt_index: int
    prompt_ids: list[int]
    answer_ids: list[int]  # every sampled id, a final stop id included (so stopping is learned)
    text: str
    finish_reason: str
    reward: float = 0.0
    sample_logps: list[float] | None = None  # the log-prob each answer token was sampled with (vLLM); None: ours


def sample_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed for one sample, stable across runs and resumes. (A seed, not a content key, so not
    `files.json_digest`: changing its bytes would change every recorded RL run's samples.)"""
    h = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class RolloutCache:
    """JSON files under `rollouts/`, written atomically: `mb-NNNNNN.json` holds one micro-batch's rollouts;
    methods may keep their own records beside them (`load` / `store`, e.g. PPO's targets)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def load(self, name: str) -> Any | None:
        """`name.json`'s content, or None when it is missing or unreadable (then it is computed again)."""
        path = self.root / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def store(self, name: str, data: Any) -> None:
        atomic_write_json(self.root / f"{name}.json", data, indent=None)

    def get(self, index: int) -> list[Rollout] | None:
        data = self.load(f"mb-{index:06d}")
        try:
            return None if data is None else [Rollout(**r) for r in data]
        except TypeError:
            return None  # not a rollout list: decode again

    def put(self, index: int, rollouts: list[Rollout]) -> None:
        self.store(f"mb-{index:06d}", [asdict(r) for r in rollouts])


@torch.no_grad()
def sample_rollouts(engine: RolloutEngine, chat: ChatFormat, items: list[PromptItem], indices: list[int], samples: int,
                    sampling: Sampling, seed: int, key: int, max_prompt: int) -> list[Rollout]:
    """`samples` answers per prompt (laid out prompt by prompt) from the rollout engine's current weights."""
    from ..engine.sampling import SamplingParams

    prompts, params = [], []
    for i in indices:
        ids = chat.encode_prompt(items[i].messages)[-max_prompt:]
        for j in range(samples):
            prompts.append(ids)
            params.append(SamplingParams.from_config(sampling, sample_seed(seed, key, i, j)))
    out = []
    for n, (ids, c) in enumerate(zip(prompts, engine.generate(prompts, params))):
        answer = c.token_ids or [chat.tokenizer.eos_token_id or 0]  # an empty answer still scores its end
        logps = c.logprobs if c.logprobs is not None and len(c.logprobs) == len(answer) else None
        out.append(Rollout(indices[n // samples], list(ids), answer, c.text, c.finish_reason, sample_logps=logps))
    return out


def rollout_batch(rollouts: list[Rollout], pad: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded batch (one rollout per row) with the answer tokens as scored positions (`score_*`)."""
    rows = [[Example(r.prompt_ids + r.answer_ids, [IGNORE_INDEX] * (len(r.prompt_ids) - 1) + r.answer_ids + [IGNORE_INDEX])]
            for r in rollouts]
    batch = collate(rows, pad, with_seq_ids=True)
    out = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **scored_positions(batch)}
    return {k: v.to(device) for k, v in out.items()}


def sampler_correction(lp: torch.Tensor, rollouts: list[Rollout], cfg: RolloutEngineConfig
                       ) -> tuple[torch.Tensor | None, dict[str, float]]:
    """(per-token importance weights for the trainer-vs-sampler mismatch, or None; the mismatch's statistics).

    `lp` (N,) holds the trainer's log-probs of the rollouts' answer tokens in order. Rollouts decoded by
    protege's own engine carry no sampler log-probs (their sampler is the trainer's model): (None, {}).
    Statistics, per token: mean |trainer - sampler log p| and the share of weights the cap truncated."""
    import math

    from .rl_losses import truncated_is_weights

    if all(r.sample_logps is None for r in rollouts):
        return None, {}
    sample = torch.tensor([x for r in rollouts for x in (r.sample_logps or [math.nan] * len(r.answer_ids))],
                          device=lp.device, dtype=torch.float32)
    diff = lp.detach().float() - sample
    known = ~torch.isnan(sample)
    count = max(float(known.sum()), 1.0)
    stats = {"logp_mismatch": float(diff[known].abs().sum()) / count}
    if cfg.is_correction == "none":
        return None, stats
    stats["is_truncated"] = float((diff[known] > math.log(cfg.is_cap)).sum()) / count
    return truncated_is_weights(lp.float(), sample, cfg.is_cap).to(lp.dtype), stats


def reference_off(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The reference policy: the model with its adapters disabled (LoRA only)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError("the reference is the policy with its LoRA adapters disabled: train with method: lora")
    return disable()


def token_kl(policy_lp: torch.Tensor, ref_lp: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """Summed k1 = logp - ref per sequence (n,): an unbiased estimate of KL in nats per answer for sampled answers."""
    return policy_lp.new_zeros(n).index_add(0, seq, policy_lp - ref_lp)


class OverOptimisationWatch:
    """Proxy, gold and KL per evaluation; a warning when gold falls twice while proxy rises; best-by-gold saves."""

    def __init__(self, out_dir: Path, save_best: Callable[[Path], None], log: Callable[[str], None]):
        self.out_dir, self.save_best, self.log = out_dir, save_best, log
        self.path = out_dir / OVEROPTIMISATION_FILE
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.history: list[dict[str, float]] = data.get("history", [])
        self.warnings: list[dict[str, Any]] = data.get("warnings", [])
        self.best: dict[str, float] | None = data.get("best")

    def record(self, step: int, proxy: float, gold: float, kl: float) -> None:
        self.history = [h for h in self.history if h["step"] < step]  # a resumed run redoes later evals
        self.warnings = [w for w in self.warnings if w["step"] < step]
        self.history.append({"step": step, "proxy": proxy, "gold": gold, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0))})
        h = self.history
        if len(h) >= 3 and h[-1]["gold"] < h[-2]["gold"] < h[-3]["gold"] and h[-1]["proxy"] > h[-3]["proxy"]:
            msg = (f"reward over-optimisation: gold fell {h[-3]['gold']:.3f} -> {h[-1]['gold']:.3f} over the last two "
                   f"evals while the proxy rose {h[-3]['proxy']:.3f} -> {h[-1]['proxy']:.3f} (KL {kl:.2f} nats); "
                   f"the best model by gold is kept in {self.out_dir / 'best'}")
            self.warnings.append({"step": step, "message": msg})
            self.log("WARNING " + msg)
        if self.best is None or gold > self.best["gold"]:
            self.best = dict(h[-1])
            self.save_best(self.out_dir / "best")
        self.path.write_text(json.dumps({"history": self.history, "warnings": self.warnings, "best": self.best},
                                        indent=2))

    def figure(self) -> Path | None:
        """gold and proxy against sqrt(KL) (Gao et al. 2022's axes) as overoptimisation.png."""
        from ..figures import overoptimisation_figure, pyplot

        fig = overoptimisation_figure([{"run": self.out_dir.name, "history": self.history}])
        if fig is None:
            return None
        path = self.out_dir / "overoptimisation.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        pyplot().close(fig)
        return path


def score_rollouts(reward: Reward, items: list[PromptItem], rollouts: list[Rollout]) -> list[float]:
    return reward([items[r.prompt_index] for r in rollouts], [r.text for r in rollouts],
                  [len(r.answer_ids) for r in rollouts], [r.finish_reason for r in rollouts])


def prompt_plan(n_prompts: int, per_batch: int, n_batches: int, seed: int) -> list[list[int]]:
    """`n_batches` batches of `per_batch` prompt indices: epochs of seeded shuffles, laid end to end."""
    import random

    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_batches * per_batch:
        epoch = list(range(n_prompts))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * per_batch:(i + 1) * per_batch] for i in range(n_batches)]


def eval_plan(n_held: int, per_batch: int) -> list[tuple[int, list[int]]]:
    """Held-out micro-batches `(key, prompt indices)`; negative keys keep their sample seeds apart from training's."""
    return [(-1 - s, list(range(s, min(s + per_batch, n_held)))) for s in range(0, n_held, per_batch)]


def load_policy(config: RolloutSettings, ctx: RunContext) -> tuple[Any, Any, Any, int, RolloutEngine]:
    """(LoRA policy in train mode, tokenizer, chat format, pad id, the engine that decodes its rollouts)."""
    from ..chat import ChatFormat
    from .fit import pad_id
    from .model import load_base, prepare_model
    from .rollout_engines import make_rollout_engine

    accelerator = ctx.accelerator
    model, tok = load_base(config, ctx.precision, accelerator.device)
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    model = prepare_model(config, model, chat).to(accelerator.device)
    model.train()
    engine = make_rollout_engine(config.rollout, model=model, tok=tok, chat=chat, spec=config.model,
                                 precision=ctx.precision.torch_name, out_dir=ctx.out_dir, max_len=config.max_length,
                                 max_batch=config.engine_batch, seed=config.seed, merge=config.merge_for_rollouts)
    return model, tok, chat, pad_id(tok), engine


def save_policy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, chat: ChatFormat, path: Path) -> None:
    """The adapter folder with its tokenizer and chat template (the best-by-gold model)."""
    model.save_pretrained(str(path))
    chat.apply_to(tok)
    tok.save_pretrained(str(path))


def split_prompts(config: RLSettings, method: str) -> tuple[list[PromptItem], list[PromptItem]]:
    """(training prompts, held-out prompts): `eval_prompts`, else a seeded `eval_fraction` of `prompts`."""
    import random

    from ..errors import StageError
    from .rewards import load_prompt_items

    items = load_prompt_items(config.prompts)
    if config.eval_prompts:
        return items, load_prompt_items(config.eval_prompts, config.eval_max_examples)
    order = list(range(len(items)))
    random.Random(config.seed).shuffle(order)
    k = min(config.eval_max_examples, int(round(len(items) * config.eval_fraction)))
    held, train = [items[i] for i in order[:k]], [items[i] for i in sorted(order[k:])]
    if not train:
        raise StageError(f"{method}: no training prompts left in {config.prompts} after holding out {len(held)}")
    return train, held


@torch.no_grad()
def policy_eval(engine: RolloutEngine, chat: ChatFormat, held: list[PromptItem], indices: list[int], proxy: Reward,
                gold: Reward, logps: Callable[[dict[str, torch.Tensor], bool], torch.Tensor], config: RolloutSettings, key: int,
                pad: int, device: torch.device | str) -> dict[str, float]:
    """Sums over held-out prompts `indices`: proxy and gold scores of greedy answers, their stops and
    tokens, and KL(policy || reference) summed per answer (k1) over one sampled answer per prompt.
    `logps(batch, reference)` gives the answer tokens' log-probs under the policy or the reference."""
    greedy = sample_rollouts(engine, chat, held, indices, 1, Sampling(max_new_tokens=config.sampling.max_new_tokens),
                             config.seed, key, config.max_prompt)
    sampled = sample_rollouts(engine, chat, held, indices, 1, config.sampling, config.seed, key, config.max_prompt)
    batch = rollout_batch(sampled, pad, device)
    kl = token_kl(logps(batch, False), logps(batch, True), batch["score_seq"], len(sampled))
    return {"proxy": sum(score_rollouts(proxy, held, greedy)), "gold": sum(score_rollouts(gold, held, greedy)),
            "kl": float(kl.sum()), "stop_rate": float(sum(r.finish_reason == "stop" for r in greedy)),
            "answer_tokens": float(sum(len(r.answer_ids) for r in greedy))}


def make_rewards(config: RLSettings, log: Callable[[str], None]) -> tuple[Reward, Reward, RewardSpec]:
    """(proxy, gold, the gold's config): gold defaults to the reward itself when it is a rule (then it
    measures success); with a reward model and no gold the watch compares the proxy with itself."""
    from .rewards import make_reward

    proxy = make_reward(config.reward)
    if config.gold is not None:
        return proxy, make_reward(config.gold), config.gold
    terms = config.reward if isinstance(config.reward, list) else [config.reward]
    if any(t.kind != "rule" for t in terms):
        log("no gold scorer given (gold:): the over-optimisation watch compares the proxy with itself")
    return proxy, proxy, config.reward


def watched_fit(name: str, config: RLSettings, *, model: torch.nn.Module, module: torch.nn.Module, accelerator: Accelerator, out_dir: Path,
                log: Callable[[str], None], micro_batches: Any, loss_fn: Callable[[Any, Any], Any],
                eval_fn: Callable[[Any, Any], Any], tokens_of: Callable[[Any], int], data_hash: str, unit: str,
                eval_batches: list[Any], save_best: Callable[[Path], None], stop_after_steps: int | None,
                engine: RolloutEngine) -> tuple[Any, OverOptimisationWatch]:
    """`fit` with the over-optimisation watch on every held-out eval, the first one before step 1 (KL 0);
    the rollout engine is told after every optimizer step that the policy changed."""
    from .fit import evaluate, fit
    from .settings import fingerprint

    watch = OverOptimisationWatch(out_dir, save_best, log)

    def on_eval(step: int, results: dict[str, float]) -> None:
        watch.record(step, results["eval_proxy"], results["eval_gold"], results["eval_kl"])
        log(f"eval at step {step}: proxy {results['eval_proxy']:.3f}, gold {results['eval_gold']:.3f}, "
            f"KL {results['eval_kl']:.2f} nats/answer, stop rate {results['eval_stop_rate']:.2f}")

    if eval_batches and not watch.history:  # the starting point anchors the over-optimisation curve
        start = evaluate(module, eval_batches, eval_fn, accelerator)
        if start is not None:
            on_eval(0, start)
    result = fit(name, config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                 micro_batches=micro_batches, loss_fn=loss_fn, tokens_of=tokens_of, fingerprint=fingerprint(config),
                 data_hash=data_hash, unit=unit, eval_batches=eval_batches, stop_after_steps=stop_after_steps,
                 on_eval=on_eval, progress=("reward", "kl"), eval_fn=eval_fn,
                 on_step=lambda step: engine.policy_changed())
    return result, watch


def rl_summary(result: Any, watch: OverOptimisationWatch, stats: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The counts every RL method reports (its manifest and return value)."""
    return {**extra, "steps": result.steps, "resumed_from_step": result.start_step, "final_loss": result.loss,
            "train_metrics": result.metrics, "eval": result.eval,
            "start": watch.history[0] if watch.history else None, "best": watch.best,
            "warnings": [w["message"] for w in watch.warnings], **stats,
            "rollout_tokens_per_s": round(stats["rollout_tokens"] / max(stats["rollout_seconds"], 1e-9), 1),
            "trainable_params": result.trainable_params, "peak_rss_mb": result.peak_rss_mb}
