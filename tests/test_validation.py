"""Validation-driven training (dpo.auto): step budget, best-step selection, early stop, resume, plot."""

from __future__ import annotations

import json

import pytest

from cfdpo.generate import GenParams
from cfdpo.validation import ValidationPlan, select_best, should_stop, step_budget


def curve(*points):
    return [{"step": s, "score": score, "kl": kl} for s, score, kl in points]


def test_step_budget_raises_small_data_to_min_steps_and_keeps_large_epochs():
    assert step_budget(1.0, 24, 8, 1, 1, 24) == 24  # 3 steps per epoch -> raised
    assert step_budget(2.0, 100, 4, 1, 1, 24) == 50  # 25 per epoch x 2 epochs: already enough
    assert step_budget(1.0, 100, 4, 2, 1, 10) == 13  # 25 batches, 2 per update -> 13
    assert step_budget(1.0, 100, 4, 1, 2, 10) == 13  # two processes share the batches
    assert step_budget(0.5, 100, 4, 1, 1, 1) == 13


def test_select_best_takes_the_best_score_within_the_kl_guard():
    c = curve((0, 0.0, 0.0), (6, 0.4, 0.02), (12, 0.9, 0.5), (18, 0.7, 0.05), (24, 0.7, 0.06))
    assert select_best(c, 0.1, "higher")["step"] == 18  # 12 scores better but breaks the guard; ties: earliest
    assert select_best(c, 1.0, "higher")["step"] == 12
    assert select_best(c, 1.0, "lower")["step"] == 6  # step 0 (the untrained adapter) is never published


def test_select_best_over_the_guard_everywhere_takes_the_lowest_kl_and_none_without_trained_steps():
    c = curve((0, 0.0, 0.0), (6, 0.4, 0.3), (12, 0.9, 0.2), (18, 0.7, 0.25))
    assert select_best(c, 0.1, "higher")["step"] == 12
    assert select_best(curve((0, 0.5, 0.0)), 0.1, "higher") is None
    assert select_best([], 0.1, "higher") is None


def test_validation_steps_are_every_step_up_to_eval_every_then_its_multiples_and_the_last():
    from cfdpo.validation import validates_at

    assert [s for s in range(1, 31) if validates_at(s, 6, 30)] == [1, 2, 3, 4, 5, 6, 12, 18, 24, 30]
    assert [s for s in range(1, 11) if validates_at(s, 3, 10)] == [1, 2, 3, 6, 9, 10]
    assert [s for s in range(1, 5) if validates_at(s, 1, 4)] == [1, 2, 3, 4]


def test_the_guard_is_broken_when_the_last_patience_trained_points_are_all_over_it():
    from cfdpo.validation import guard_broken

    over = curve((0, 0.0, 0.0), (1, 0.2, 0.05), (2, 0.4, 0.3), (4, 0.6, 0.5))
    assert guard_broken(over, 2, 0.1)
    assert not guard_broken(over, 3, 0.1)  # step 1 was within
    assert not guard_broken(over[:3], 2, 0.1)  # only one point over
    assert not guard_broken(curve((0, 0.0, 0.0)), 1, 0.1)  # step 0 is not a trained point


def test_should_stop_after_patience_evaluations_without_a_better_step():
    rising = curve((0, 0.0, 0.0), (6, 0.2, 0.0), (12, 0.4, 0.0), (18, 0.5, 0.0))
    assert not should_stop(rising, 2, 0.1, "higher")
    flat = curve((0, 0.0, 0.0), (6, 0.2, 0.0), (12, 0.2, 0.0), (18, 0.1, 0.0))
    assert should_stop(flat, 2, 0.1, "higher")
    assert not should_stop(flat, 3, 0.1, "higher")
    drifting = curve((0, 0.0, 0.0), (6, 0.2, 0.0), (12, 0.6, 0.4), (18, 0.8, 0.9))  # better scores, over the guard
    assert should_stop(drifting, 2, 0.1, "higher")
    assert not should_stop(curve((0, 0.0, 0.0)), 1, 0.1, "higher")


class ScriptedScorer:
    """Scores each validation in turn from a script (the behaviour 'improves' exactly as written)."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def score_many(self, answers):
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [value] * len(answers)


def pairs(n):
    from datasets import Dataset

    def conv(text, role="user"):
        return [{"role": role, "content": text}]

    return Dataset.from_dict({
        "prompt": [conv(f"Question {i}?") for i in range(n)],
        "chosen": [conv(f"Plain answer {i}.", "assistant") for i in range(n)],
        "rejected": [conv(f"Arr matey ye answer {i}!", "assistant") for i in range(n)],
    })


def plan(scorer, **over):
    convs = [[{"role": "user", "content": f"Tell me about thing {i}."}] for i in range(3)]
    knobs = dict(conversations=convs, kl_conversations=convs[:2], condition="control", scorer=scorer,
                 desired="higher", answer_params=GenParams(4, 0.0, 1.0), kl_params=GenParams(4, 0.8, 0.9),
                 batch_size=4, seed=0, min_steps=6, eval_every=3, patience=2, max_kl=10.0)
    return ValidationPlan(**{**knobs, **over})


def weights_at(steps: set[int], seen: dict):
    """A callback that keeps the adapter weights after each step in `steps`."""
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step in steps:
                seen[state.global_step] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    return Keep()


def published(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def same_weights(a, b):
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_publishes_the_best_step_and_stops_early(tiny_model, tmp_path, monkeypatch):
    import cfdpo.train as T
    from cfdpo.spec import DPOSpec

    seen: dict = {}
    quiet = T._quiet
    monkeypatch.setattr(T, "_quiet", lambda trainer, *a: (quiet(trainer, *a), trainer.add_callback(weights_at({6, 12}, seen))))
    spec = DPOSpec(batch_size=2, epochs=10, max_length=64, lora_r=4, lora_alpha=8, save_steps=50)
    # validations at steps 0, 1, 2, 3 (every step up to eval_every), 6, 9, 12: step 6 is best, 9 and 12 are no better
    # -> stop at 12 of 30
    out = T.train_dpo(str(tiny_model), pairs(6), spec, tmp_path / "adapters" / "enc",
                      validation=plan(ScriptedScorer([0.0, 0.1, 0.2, 0.3, 0.8, 0.5, 0.8, 0.9])))
    log = json.loads((out / "train_log.json").read_text())
    assert [p["step"] for p in log["validation"]] == [0, 1, 2, 3, 6, 9, 12]
    assert all(set(p) == {"step", "score", "kl"} for p in log["validation"]), log["validation"]
    assert log["validation"][-1]["kl"] != 0.0
    assert log["validation"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the untrained adapter is the base
    assert log["best_step"] == 6
    assert log["auto"]["max_steps"] == 30 and log["auto"]["stopped_early"]
    assert max(e["step"] for e in log["log_history"] if "loss" in e) == 12
    assert same_weights(published(out), seen[6]) and not same_weights(published(out), seen[12])


def test_auto_raises_the_steps_to_min_steps_and_off_keeps_the_epochs(tiny_model, tmp_path):
    import cfdpo.train as T
    from cfdpo.spec import DPOSpec

    spec = DPOSpec(batch_size=2, epochs=1, max_length=64, lora_r=4, lora_alpha=8)
    auto = T.train_dpo(str(tiny_model), pairs(4), spec, tmp_path / "auto",
                       validation=plan(ScriptedScorer([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]), min_steps=7, eval_every=4))
    log = json.loads((auto / "train_log.json").read_text())
    assert max(e["step"] for e in log["log_history"] if "loss" in e) == 7
    assert [p["step"] for p in log["validation"]] == [0, 1, 2, 3, 4, 7]  # and the last step
    assert log["best_step"] == 7
    plain = T.train_dpo(str(tiny_model), pairs(4), spec, tmp_path / "plain")
    log = json.loads((plain / "train_log.json").read_text())
    assert max(e["step"] for e in log["log_history"] if "loss" in e) == 2
    assert "validation" not in log


def test_auto_stops_before_min_steps_once_every_recent_step_broke_the_guard(tiny_model, tmp_path, monkeypatch):
    import cfdpo.train as T
    from cfdpo.spec import DPOSpec
    from cfdpo.validation import ValidationCallback

    # the KL as scripted NLLs: the base's 1.0, then step 0 at KL 0, steps 1, 2, 3, 6, ... at 0.5, 0.3, 0.4, 0.6, 0.7
    nll = iter([1.0, 1.0, 1.5, 1.3, 1.4, 1.6, 1.7, 1.8, 1.9])
    monkeypatch.setattr(ValidationCallback, "_nll", lambda self, model, conversations=None: next(nll))
    spec = DPOSpec(batch_size=2, epochs=10, max_length=64, lora_r=4, lora_alpha=8, save_steps=50)
    # every trained step is over the 0.1 guard: step 2 (lowest KL) is two validations old at step 6, and min_steps 12
    # does not hold the stop back
    out = T.train_dpo(str(tiny_model), pairs(6), spec, tmp_path / "adapters" / "dis",
                      validation=plan(ScriptedScorer([0.0, 0.1, 0.2, 0.3]), min_steps=12, max_kl=0.1))
    log = json.loads((out / "train_log.json").read_text())
    assert [p["step"] for p in log["validation"]] == [0, 1, 2, 3, 6]
    assert [p["kl"] for p in log["validation"]] == pytest.approx([0.0, 0.5, 0.3, 0.4, 0.6])
    assert max(e["step"] for e in log["log_history"] if "loss" in e) == 6 and log["auto"]["stopped_early"]
    assert log["best_step"] == 2


def test_a_killed_auto_run_resumes_with_its_curve_and_best_adapter(tiny_model, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import cfdpo.train as T
    from cfdpo.spec import DPOSpec

    class Crash(Exception):
        pass

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 7:  # checkpoint-6 holds the curve of steps 0, 1, 2, 3, 6
                raise Crash

    seen: dict = {}
    quiet = T._quiet
    monkeypatch.setattr(T, "_quiet", lambda trainer, *a: (quiet(trainer, *a), trainer.add_callback(Kill()),
                                                          trainer.add_callback(weights_at({3}, seen))))
    spec = DPOSpec(batch_size=2, epochs=4, max_length=64, lora_r=4, lora_alpha=8, save_steps=2)
    out = tmp_path / "adapters" / "enc"
    # the killed run: best at step 3; the rerun scores every later validation lower -> step 3 is published
    with pytest.raises(Crash):
        T.train_dpo(str(tiny_model), pairs(6), spec, out, validation=plan(ScriptedScorer([0.0, 0.2, 0.3, 0.9, 0.5]),
                                                                          patience=5))
    work = out.with_name(".enc-work")
    assert T.last_checkpoint(work).endswith("checkpoint-6")
    monkeypatch.setattr(T, "_quiet", quiet)
    rerun = ScriptedScorer([0.1])
    T.train_dpo(str(tiny_model), pairs(6), spec, out, validation=plan(rerun, patience=5))
    log = json.loads((out / "train_log.json").read_text())
    assert [p["step"] for p in log["validation"]] == [0, 1, 2, 3, 6, 9, 12]
    assert [p["score"] for p in log["validation"]] == pytest.approx([0.0, 0.2, 0.3, 0.9, 0.5, 0.1, 0.1])
    assert rerun.calls == 2  # steps 0-6 come from the checkpoint, not measured again
    assert log["best_step"] == 3 and same_weights(published(out), seen[3])
    assert not work.exists()


def test_plot_validation_writes_one_png_per_adapter_with_a_curve(tmp_path):
    from cfdpo.validation import plot_validation

    for name, log in (("enc", {"validation": curve((0, 0.1, 0.0), (6, 0.5, 0.02)), "best_step": 6,
                               "auto": {"condition": "control"}}),
                      ("dis", {"log_history": []})):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "train_log.json").write_text(json.dumps(log))
    paths = plot_validation(tmp_path)
    assert paths == [tmp_path / "plots" / "validation_enc.png"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def test_kl_bound_rises_to_the_teachers_kl_only():
    from cfdpo.validation import kl_bound

    assert kl_bound(0.1, None) == 0.1
    assert kl_bound(0.1, 0.156) == 0.156
    assert kl_bound(0.1, 0.02) == 0.1


def test_the_guard_is_the_teachers_kl_on_the_base_answers(tiny_model, tmp_path, monkeypatch):
    """teacher_kl = NLL of the base's KL answers under the teacher's conversations - under the control ones,
    both with the base model; the published step is judged against max(max_kl, teacher_kl)."""
    import cfdpo.train as T
    from cfdpo.likelihood import mean_nll
    from cfdpo.models import load_model, load_tokenizer
    from cfdpo.spec import DPOSpec
    from cfdpo.validation import ValidationCallback

    sampled = []
    answers = ValidationCallback._answers
    monkeypatch.setattr(ValidationCallback, "_answers", lambda self, model, convs, params: (
        out := answers(self, model, convs, params), params == self.plan.kl_params and sampled.append(out))[0])
    base = plan(ScriptedScorer([0.0, 0.5, 0.9]))
    teacher = [[{"role": "user", "content": "Answer like a pirate, arr. " + c[0]["content"]}] for c in base.kl_conversations]
    validation = plan(ScriptedScorer([0.0, 0.5, 0.9]), max_kl=1e-9, teacher_conversations=teacher)
    spec = DPOSpec(batch_size=2, epochs=1, max_length=64, lora_r=4, lora_alpha=8, save_steps=50)
    out = T.train_dpo(str(tiny_model), pairs(6), spec, tmp_path / "adapters" / "enc", validation=validation)
    log = json.loads((out / "train_log.json").read_text())
    tok, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    assert len(sampled) == 1  # the base samples its KL answers once
    direct = mean_nll(model, tok, teacher, sampled[0], 4) - mean_nll(model, tok, base.kl_conversations, sampled[0], 4)
    assert log["auto"]["teacher_kl"] == pytest.approx(direct, abs=1e-4) and abs(direct) > 1e-3
    assert log["auto"]["kl_bound"] == pytest.approx(max(1e-9, direct), abs=1e-4)
    no_teacher = T.train_dpo(str(tiny_model), pairs(6), spec, tmp_path / "adapters" / "dis",
                             validation=plan(ScriptedScorer([0.0]), max_kl=0.05))
    auto = json.loads((no_teacher / "train_log.json").read_text())["auto"]
    assert auto["teacher_kl"] is None and auto["kl_bound"] == 0.05


def test_only_adapters_that_learn_the_teachers_answers_get_the_teacher_guard():
    from types import SimpleNamespace

    from cfdpo.pipeline import validation_plan
    from cfdpo.recipe import Recipe

    recipe = Recipe.model_validate({
        "behaviour": {"name": "x", "treatment": "Be brief.", "negative": "Ramble on.",
                      "scorer": {"name": "length", "desired": "lower"}},
        "prompts": {"source": "general", "train_size": 20, "eval_size": 10},
        "variants": ["enc", "dis", "contrastive", "negation"], "dpo": {"auto": True}})
    run = SimpleNamespace(recipe=recipe, validation_prompts=lambda: [{"id": "a", "prompt": "Hi?"}])
    teacher = {v: validation_plan(run, v).teacher_conversations for v in recipe.variants}
    assert teacher["enc"] == teacher["contrastive"] == [[{"role": "user", "content": "Be brief.\n\nHi?"}]]
    assert teacher["dis"] is None and teacher["negation"] is None
    # scored where the behaviour shows: unasked for enc, under the negative instruction for the variants
    # that train the negative answers away (unasked a base may show none of it: a flat curve)
    asked = {v: validation_plan(run, v).conversations for v in recipe.variants}
    assert asked["enc"] == [[{"role": "user", "content": "Hi?"}]]
    assert asked["dis"] == asked["contrastive"] == asked["negation"] == [[{"role": "user", "content": "Ramble on.\n\nHi?"}]]
