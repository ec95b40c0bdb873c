"""Validation-driven training (`dpo.auto`): a step budget that does not collapse on small data, a
validation curve, the best step published, and an early stop.

- Budget: `step_budget` raises the optimizer steps to at least `dpo.min_steps` (the recipe's
  `epochs` is then a lower bound).
- Curve: at step 0 (the untrained adapter, i.e. the base model), at every step up to
  `dpo.eval_every` (a few pairs at the default learning rate can cross the guard within two steps:
  `concise` went from 43 to 18 words per answer and from KL 0.08 to 0.20 between steps 4 and 6), then
  every `dpo.eval_every` steps and at the last (`validates_at`), `ValidationCallback` answers the
  validation prompts greedily under the variant's `validation_condition` (control for enc; negative
  for dis, contrastive and negation, which train the negative answers away: unasked, a base that
  shows none of the behaviour gives a flat curve, as cowboy's DIS and knight's Contrastive did at
  0.000 on every step), scores the answers with the recipe's scorer, and
  estimates KL(base || policy) in nats per answer token on a few answers the base model sampled
  to the validation prompts' control conversations (the base is the same model with the adapter
  disabled). Points are {step, score, kl}.
- Selection: `select_best` takes the best-scoring trained step whose KL stays within the guard
  (ties: the earliest); when every trained step is over the guard, the one with the lowest KL.
  The guard (`kl_bound`) is `dpo.max_kl`, raised to the prompted teacher's own KL where the adapter
  learns the teacher's answers (enc, contrastive): the KL of the base given the treatment
  instruction, on the same base answers. A style that changes every answer (brevity) costs KL on
  any prompt; an adapter may cost what the instruction itself costs.
  The trainer publishes that step's adapter, not the last.
- Early stop: `should_stop` once the selected step is `dpo.patience` evaluations old, and not
  before `dpo.min_steps` unless the last `dpo.patience` evaluations all broke the guard
  (`guard_broken`: more steps at the same learning rate do not bring the KL back).

State (the curve, the base's KL answers and the best adapter so far) lives in the trainer's work
directory under `validation/` and is copied into every checkpoint, so a resumed run continues from
the curve of the checkpoint it resumes from.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from cfdpo import counterfactual, dist
from cfdpo.capability import kl_sample_params
from cfdpo.generate import GenParams
from cfdpo.runio import read_json, write_atomic, write_json

KL_ANSWERS = 4  # base-sampled answers the KL guard is estimated on (the first validation prompts')
STATE = "validation"  # the state's folder in the work directory and in each checkpoint


@dataclass(frozen=True)
class ValidationPlan:
    """What the callback needs from the recipe: the validation conversations and how to judge them."""

    conversations: list  # validation prompts under the variant's prompt condition
    kl_conversations: list  # control conversations the base samples its KL answers to
    condition: str
    scorer: object  # a `cfdpo.scorers.Scorer`
    desired: str  # "higher" or "lower"
    answer_params: GenParams  # greedy validation answers
    kl_params: GenParams  # the base's sampled answers
    batch_size: int
    seed: int
    min_steps: int
    eval_every: int
    patience: int
    max_kl: float
    teacher_conversations: list | None = None  # the KL prompts under the treatment (enc, contrastive)


def plan_validation(recipe, prompts: list[dict], condition: str, teacher: bool = False) -> ValidationPlan:
    """The plan for one adapter whose DPO prompt is `condition`, on the validation `prompts`;
    `teacher`: its chosen answers are the treatment's, so the guard may rise to the teacher's KL."""
    from cfdpo.scorers import make_scorer

    b, g, ev, dpo = recipe.behaviour, recipe.generation, recipe.evaluation, recipe.dpo
    return ValidationPlan(
        conversations=[counterfactual.messages(p["prompt"], condition, b, p["id"], g.seed) for p in prompts],
        kl_conversations=[counterfactual.messages(p["prompt"], "control", b) for p in prompts[:KL_ANSWERS]],
        condition=condition, scorer=make_scorer(b.scorer.name, b.scorer.params), desired=b.scorer.desired,
        answer_params=GenParams(ev.max_new_tokens, 0.0, 1.0),
        kl_params=kl_sample_params(ev.max_new_tokens),
        batch_size=ev.batch_size, seed=g.seed, min_steps=dpo.min_steps, eval_every=dpo.eval_every,
        patience=dpo.patience, max_kl=dpo.max_kl,
        teacher_conversations=[counterfactual.messages(p["prompt"], "treatment", b, p["id"], g.seed)
                               for p in prompts[:KL_ANSWERS]] if teacher else None,
    )


# --- the pure core ---

def step_budget(epochs: float, examples: int, batch_size: int, grad_accum: int, processes: int, min_steps: int) -> int:
    """Optimizer steps: `epochs` passes (counted as the Trainer counts them), at least `min_steps`."""
    batches = math.ceil(examples / (batch_size * processes))
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    return max(math.ceil(epochs * per_epoch), min_steps)


def validates_at(step: int, eval_every: int, max_steps: int) -> bool:
    """Whether the curve gets a point at `step`: every step up to `eval_every`, then its multiples and the last."""
    return step <= eval_every or step % eval_every == 0 or step >= max_steps


def kl_bound(max_kl: float, teacher_kl: float | None) -> float:
    """The KL guard: `max_kl`, or the teacher's own KL where that is larger (None: no teacher)."""
    return max_kl if teacher_kl is None else max(max_kl, teacher_kl)


def _better(score: float, than: float, desired: str) -> bool:
    return score > than if desired == "higher" else score < than


def select_best(curve: list[dict], max_kl: float, desired: str) -> dict | None:
    """The point to publish among the trained steps (step > 0) of `curve` ([{step, score, kl}]):
    the best score among those with kl <= max_kl, the earliest on ties; when none is within the guard,
    the lowest kl. None without trained steps."""
    trained = [p for p in curve if p["step"] > 0]
    within = [p for p in trained if p["kl"] <= max_kl]
    if not within:
        return min(trained, key=lambda p: p["kl"], default=None)
    best = within[0]
    for point in within[1:]:
        if _better(point["score"], best["score"], desired):
            best = point
    return best


def should_stop(curve: list[dict], patience: int, max_kl: float, desired: str) -> bool:
    """Whether the selected point (`select_best`) is `patience` or more evaluations older than the last
    one: the score stopped improving, or the newer steps broke the KL guard."""
    best = select_best(curve, max_kl, desired)
    if best is None:
        return False
    trained = [p for p in curve if p["step"] > 0]
    return len(trained) - 1 - trained.index(best) >= patience


def guard_broken(curve: list[dict], patience: int, max_kl: float) -> bool:
    """Whether the last `patience` trained points all have kl over the guard."""
    last = [p for p in curve if p["step"] > 0][-patience:]
    return len(last) == patience and all(p["kl"] > max_kl for p in last)


# --- the callback ---

class ValidationCallback(TrainerCallback):
    """Evaluates the adapter during training (see the module docstring); `best_weights()` at the end."""

    def __init__(self, plan: ValidationPlan, tokenizer, work: Path, autocast: Callable, resume_from: str | None):
        self.plan = plan
        self.tokenizer = tokenizer
        self.state_dir = work / STATE
        self.autocast = autocast
        self.resume_from = resume_from
        self.curve: list[dict] = []
        self.kl_answers: list[str] | None = None
        self.base_nll: float | None = None
        self.teacher_kl: float | None = None
        self.stopped_early = False

    @property
    def bound(self) -> float:
        return kl_bound(self.plan.max_kl, self.teacher_kl)

    # state on disk ------------------------------------------------------------------------
    def _load(self) -> None:
        """The state saved with the checkpoint training resumes from (nothing: start afresh)."""
        saved = Path(self.resume_from) / STATE if self.resume_from else None
        if dist.is_main():
            shutil.rmtree(self.state_dir, ignore_errors=True)
            if saved is not None and (saved / "state.json").is_file():
                shutil.copytree(saved, self.state_dir)
        dist.barrier()
        if (self.state_dir / "state.json").is_file():
            state = read_json(self.state_dir / "state.json")
            self.curve, self.kl_answers, self.base_nll = state["curve"], state["kl_answers"], state["base_nll"]
            self.teacher_kl = state.get("teacher_kl")

    def _write_state(self) -> None:
        if dist.is_main():
            write_json(self.state_dir / "state.json",
                       {"curve": self.curve, "kl_answers": self.kl_answers, "base_nll": self.base_nll,
                        "teacher_kl": self.teacher_kl})

    def _save_best(self, model) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save

        if dist.is_main():
            weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            write_atomic(self.state_dir / "best.safetensors", save(weights))

    def best_weights(self):
        """The adapter weights of the selected step (None: no trained step was evaluated; keep the last)."""
        from safetensors.torch import load_file

        path = self.state_dir / "best.safetensors"
        if select_best(self.curve, self.bound, self.plan.desired) is None or not path.is_file():
            return None
        return load_file(str(path))

    # measuring ----------------------------------------------------------------------------
    def _answers(self, model, conversations: list, params: GenParams) -> list[str]:
        from cfdpo.backends.transformers import generate_answers

        out: list[str] = [""] * len(conversations)

        def keep(indices, answers, _counts):
            for i, texts in zip(indices, answers):
                out[i] = texts[0]

        generate_answers(model, self.tokenizer, conversations, params, [1] * len(conversations),
                         self.plan.batch_size, self.plan.seed, keep)
        return out

    def _nll(self, model, conversations: list | None = None) -> float:
        """Mean NLL per answer token of the base's KL answers under `conversations` (default: the control ones)."""
        from cfdpo.likelihood import mean_nll

        return mean_nll(model, self.tokenizer, conversations or self.plan.kl_conversations, self.kl_answers,
                        self.plan.batch_size)

    def _measure(self, model, step: int) -> None:
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                if self.kl_answers is None:
                    with model.disable_adapter():
                        self.kl_answers = self._answers(model, self.plan.kl_conversations, self.plan.kl_params)
                        self.base_nll = self._nll(model)
                        if self.plan.teacher_conversations and self.kl_answers:
                            self.teacher_kl = self._nll(model, self.plan.teacher_conversations) - self.base_nll
                answers = self._answers(model, self.plan.conversations, self.plan.answer_params)
                kl = self._nll(model) - self.base_nll if self.kl_answers else 0.0
        finally:
            model.train(was_training)
        scores = self.plan.scorer.score_many(answers)
        point = {"step": step, "score": sum(scores) / len(scores), "kl": 0.0 if math.isnan(kl) else kl}
        before = select_best(self.curve, self.bound, self.plan.desired)
        self.curve.append(point)
        if select_best(self.curve, self.bound, self.plan.desired) is not before:
            self._save_best(model)
        self._write_state()

    # trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._load()
        if self.plan.conversations and not self.curve:
            self._measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not self.plan.conversations or not validates_at(step, self.plan.eval_every, state.max_steps):
            return
        self._measure(model, step)
        may_stop = step >= self.plan.min_steps or guard_broken(self.curve, self.plan.patience, self.bound)
        if may_stop and step < state.max_steps and should_stop(
                self.curve, self.plan.patience, self.bound, self.plan.desired):
            control.should_training_stop = True
            self.stopped_early = True

    def on_save(self, args, state, control, **kwargs):
        if dist.is_main() and (self.state_dir / "state.json").is_file():
            target = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.state_dir, target)

    def log(self, max_steps: int) -> dict:
        """What train_log.json records: the curve, the published step and the settings behind them."""
        best = select_best(self.curve, self.bound, self.plan.desired)
        return {
            "validation": self.curve,
            "best_step": best["step"] if best else None,
            "auto": {"max_steps": max_steps, "min_steps": self.plan.min_steps, "eval_every": self.plan.eval_every,
                     "patience": self.plan.patience, "max_kl": self.plan.max_kl, "teacher_kl": self.teacher_kl,
                     "kl_bound": self.bound, "condition": self.plan.condition,
                     "validation_prompts": len(self.plan.conversations), "stopped_early": self.stopped_early},
        }


# --- the report's plot ---

def plot_validation(run_dir: str | Path) -> list[Path]:
    """`plots/validation_<adapter>.png` for every adapter whose train_log.json has a validation curve:
    score per step (left axis) and KL per answer token (right axis), the published step marked."""
    import io
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    paths = []
    for log_path in sorted(run.glob("adapters/*/train_log.json")):
        try:
            log = json.loads(log_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        curve = log.get("validation") if isinstance(log, dict) else None
        if not curve:
            continue
        name = log_path.parent.name
        steps = [p["step"] for p in curve]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(steps, [p["score"] for p in curve], "o-", label="score")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation score ({log.get('auto', {}).get('condition', '?')} prompt)")
        kl_ax = ax.twinx()
        kl_ax.plot(steps, [p["kl"] for p in curve], "s--", color="#888", label="KL")
        kl_ax.set_ylabel("KL(base || model), nats/token")
        bound = log.get("auto", {}).get("kl_bound")
        if bound is not None:
            kl_ax.axhline(bound, color="#c44", lw=0.8, ls="--", label=f"KL guard ({bound:.3g})")
        if log.get("best_step") is not None:
            ax.axvline(log["best_step"], color="k", lw=0.8, ls=":", label=f"published (step {log['best_step']})")
        ax.set_title(f"{name}: validation during training")
        handles = [h for a in (ax, kl_ax) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, loc="upper left", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = run / "plots" / f"validation_{name}.png"
        write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths
