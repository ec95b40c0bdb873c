"""The steering-vector baseline: the hook, the vectors, the choice on the validation prompts, and the
`steering` model on the scorecard end to end (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from cfdpo import steering
from cfdpo.cli import main
from cfdpo.recipe import parse_recipe
from cfdpo.spec import Behaviour, SteeringSpec
from cfdpo.steering import SteeringChoice, SteeringVectors


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def logits_of(model, tok, text="Why is the sky blue?"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


def random_vectors(hidden: int, layers: int = 2) -> SteeringVectors:
    gen = torch.Generator().manual_seed(0)
    return SteeringVectors("k", ("treatment", "negative"), (1, 1),
                           torch.randn(layers, hidden, generator=gen).tolist(), [2.0, 3.0][:layers])


def layer_output(model, layer, tok, text="Why is the sky blue?"):
    """The output of decoder layer `layer`, as the next module sees it (after any hook registered before)."""
    seen = {}
    handle = steering.decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: seen.update(h=out))
    try:
        logits_of(model, tok, text)
    finally:
        handle.remove()
    return steering.layer_outputs(seen["h"])


@pytest.mark.parametrize("layer", [0, 1])
def test_the_hook_adds_strength_times_residual_norm_times_the_unit_vector_at_every_position(loaded, layer):
    model, tok = loaded
    vectors = random_vectors(model.config.hidden_size)
    plain, plain_logits = layer_output(model, layer, tok), logits_of(model, tok)
    with steering.steered(model, layer, vectors.delta(layer, 0.5)):
        moved, moved_logits = layer_output(model, layer, tok), logits_of(model, tok)
    unit = torch.tensor(vectors.vectors[layer]) / torch.tensor(vectors.vectors[layer]).norm()
    expected = 0.5 * vectors.residual_norms[layer] * unit
    assert torch.allclose(moved - plain, expected.expand_as(plain), atol=1e-5)
    assert not torch.allclose(moved_logits, plain_logits, atol=1e-4)


def test_zero_strength_changes_nothing_and_removing_the_hook_restores_the_logits_exactly(loaded):
    model, tok = loaded
    vectors = random_vectors(model.config.hidden_size)
    plain = logits_of(model, tok)
    with steering.steered(model, 0, vectors.delta(0, 0.0)):
        assert torch.equal(logits_of(model, tok), plain)
    with steering.steered(model, 1, vectors.delta(1, 1.0)):
        assert not torch.equal(logits_of(model, tok), plain)
    assert torch.equal(logits_of(model, tok), plain)


def test_eval_models_turn_the_hook_on_for_steering_only(tiny_model):
    from cfdpo.evaluate import EvalModels

    recipe = parse_recipe(tiny_recipe(tiny_model, evaluation={"baselines": ["steering"]}))
    models = EvalModels(str(tiny_model), recipe, {})
    model, tok = models.use("base")
    plain = logits_of(model, tok)
    models.add_steering(SteeringChoice(random_vectors(model.config.hidden_size), 1, 1.0))
    assert models.labels == ["base", "prompted", "steering"]
    assert not torch.equal(logits_of(*models.use("steering")), plain)
    for label in ("base", "prompted"):
        assert torch.equal(logits_of(*models.use(label)), plain)
    assert models.model_name("steering") != models.model_name("base")


BEHAVIOUR = Behaviour(name="pirate", treatment="Answer plainly.", negative="Talk like a pirate.",
                      scorer={"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}})
ROWS = [
    {"prompt": "Why is the sky blue?", "condition": "treatment", "answer": "Light scatters in the air."},
    {"prompt": "Name a fruit.", "condition": "treatment", "answer": "An apple."},
    {"prompt": "Why is the sky blue?", "condition": "negative", "answer": "Arr, the sea be blue, matey, ahoy!"},
    {"prompt": "Name a fruit.", "condition": "negative", "answer": "Arr"},
    {"prompt": "Name a fruit.", "condition": "control", "answer": "A pear, which is a fruit."},
    {"prompt": "Name a fruit.", "condition": "negative", "answer": "  "},  # empty: no tokens, left out
]


def direct_means(model, tok, condition: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per layer: the mean over `condition`'s answers of the mean layer output over the answer's tokens,
    one unpadded sequence at a time through output_hidden_states (the final norm set aside, so the last
    entry is the last layer's output); and the summed residual norms and the token count."""
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    means, norm_sum, count = [], 0.0, 0
    try:
        for row in ROWS:
            if row["condition"] != condition or not row["answer"].strip():
                continue
            conv = [{"role": "user", "content": row["prompt"]}]
            prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([list(prompt) + answer]), output_hidden_states=True)
            hidden = torch.stack(out.hidden_states[1:])[:, 0, len(prompt):]  # [layers, answer tokens, hidden]
            means.append(hidden.mean(1))
            norm_sum = norm_sum + hidden.norm(dim=-1).sum(1)
            count += len(answer)
    finally:
        model.model.norm = norm
    return torch.stack(means).mean(0), norm_sum, count


def test_the_vector_is_the_mean_difference_of_the_answers_activations(loaded, tmp_path):
    model, tok = loaded
    cache = tmp_path / "steering.json"
    contrast = ("treatment", "negative")
    vectors = steering.steering_vectors(model, tok, "tiny", BEHAVIOUR, contrast, ROWS, cache, batch_size=2)
    desired, desired_norms, n_desired = direct_means(model, tok, "treatment")
    undesired, undesired_norms, n_undesired = direct_means(model, tok, "negative")
    assert vectors.n_answers == (2, 2)
    assert torch.allclose(torch.tensor(vectors.vectors), desired - undesired, atol=1e-5)
    norms = (desired_norms + undesired_norms) / (n_desired + n_undesired)
    assert torch.allclose(torch.tensor(vectors.residual_norms), norms, atol=1e-4)
    assert json.loads(cache.read_text())["key"] == vectors.key  # cached; other answers get another key
    changed = [{**r, "answer": r["answer"] + " Yes."} for r in ROWS]
    assert steering.steering_vectors(model, tok, "tiny", BEHAVIOUR, contrast, changed, cache, 2).key != vectors.key


def test_the_contrast_follows_the_conditions_generation_answered():
    assert steering.contrast(["control", "treatment", "negative"]) == ("treatment", "negative")
    assert steering.contrast(["control", "treatment"]) == ("treatment", "control")
    assert steering.contrast(["control", "negative"]) == ("control", "negative")


def test_grid_points_cover_a_quarter_half_and_three_quarters_of_depth_unless_given():
    assert {layer for layer, _ in steering.grid_points(30, SteeringSpec())} == {7, 15, 22}
    assert steering.grid_points(2, SteeringSpec(strength=0.3)) == [(0, 0.3), (1, 0.3)]
    assert steering.grid_points(30, SteeringSpec(layer=4, strength=2.0)) == [(4, 2.0)]


def test_pick_takes_the_best_score_among_points_no_more_degenerate_than_base_allows():
    grid = [{"layer": 1, "strength": 0.25, "score": 0.5, "degenerate_share": 0.0, "kl_per_token": 0.0},
            {"layer": 1, "strength": 0.5, "score": 0.2, "degenerate_share": 0.1, "kl_per_token": 0.0},
            {"layer": 1, "strength": 1.0, "score": 0.0, "degenerate_share": 0.5, "kl_per_token": 0.0}]
    assert steering.pick(grid, 0.0, "lower", 0.1)["strength"] == 0.5  # 1.0 scores best but is degenerate
    assert steering.pick(grid, 0.5, "lower", 0.1)["strength"] == 1.0
    assert steering.pick(grid, 0.0, "higher", 0.1)["strength"] == 0.25
    tie = [{**grid[1], "strength": 0.5}, {**grid[1], "strength": 0.25}]
    assert steering.pick(tie, 0.0, "lower", 0.1)["strength"] == 0.25


def test_pick_skips_a_point_over_the_kl_bound_even_when_it_scores_best():
    grid = [{"layer": 1, "strength": 0.125, "score": 0.5, "degenerate_share": 0.0, "kl_per_token": 0.02},
            {"layer": 1, "strength": 0.25, "score": 0.3, "degenerate_share": 0.0, "kl_per_token": 0.08},
            {"layer": 1, "strength": 0.5, "score": 0.0, "degenerate_share": 0.0, "kl_per_token": 0.9}]
    assert steering.pick(grid, 0.0, "lower", 0.1)["strength"] == 0.25
    assert not steering.qualifies(grid[2], 0.0, 0.1) and steering.qualifies(grid[1], 0.0, 0.1)
    assert steering.pick(grid, 0.0, "lower", 1.0)["strength"] == 0.5
    # none within the bound: the smallest KL, however it scores or however degenerate the rest are
    assert steering.pick(grid, 0.0, "lower", 0.01)["strength"] == 0.125
    mixed = [{**grid[0], "degenerate_share": 0.5}, grid[2]]  # one over the bound, the other degenerate
    assert steering.pick(mixed, 0.0, "lower", 0.1)["strength"] == 0.125


def test_grid_kl_is_zero_at_strength_zero_and_kl_summary_of_the_steered_log_probs(loaded, tmp_path):
    from cfdpo import counterfactual
    from cfdpo.capability import kl_sample_params, kl_summary
    from cfdpo.likelihood import answer_token_logprobs

    model, tok = loaded
    vectors = random_vectors(model.config.hidden_size)
    convs = [counterfactual.messages(p, "control", BEHAVIOUR) for p in ("Why is the sky blue?", "Name a fruit.")]
    params, cache = kl_sample_params(5), tmp_path / "steering_kl.json"
    choices = [SteeringChoice(vectors, 0, 0.0), SteeringChoice(vectors, 1, 1.0)]
    kls = steering.grid_kl(model, tok, "tiny", convs, params, 3, choices, cache, batch_size=2)
    answer_ids = json.loads(cache.read_text())["answer_ids"]
    assert len(answer_ids) == 2 and all(answer_ids)
    base = answer_token_logprobs(model, tok, convs, answer_ids, 2)
    with steering.steered(model, 1, vectors.delta(1, 1.0)):
        steered = answer_token_logprobs(model, tok, convs, answer_ids, 2)
    assert kls[0] == 0.0
    assert kls[1] == pytest.approx(kl_summary(base, steered)["kl_per_token"], abs=1e-6) and kls[1] != 0.0
    assert steering.grid_kl(model, tok, "tiny", convs, params, 3, choices[::-1], cache, 2) == kls[::-1]  # cached


def one_line_error(capsys) -> str:
    """The CLI's error output: exactly one line, no traceback."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def test_an_unknown_baseline_is_a_one_line_error(tiny_model, tmp_path, capsys):
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, evaluation={"baselines": ["steer"]}))
    assert main(["generate", str(tmp_path / "run"), "--recipe", str(rec)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: ") and line.endswith("r.yaml: evaluation.baselines.0: Input should be 'steering'")


def test_a_layer_the_model_lacks_is_a_one_line_error_before_any_decoding(tiny_model, tmp_path, capsys):
    evaluation = {"max_new_tokens": 4, "baselines": ["steering"], "steering": {"layer": 2}}
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, evaluation=evaluation))
    run = tmp_path / "run"
    assert main(["evaluate", str(run), "--recipe", str(rec)]) == 2
    line = one_line_error(capsys)
    assert line == "error: evaluation.steering.layer: 2 is out of range; the model has 2 decoder layers (0 to 1)"
    assert not (run / "eval").exists()


def test_steering_is_scored_on_the_whole_scorecard_end_to_end(tiny_model, tmp_path):
    evaluation = {"max_new_tokens": 6, "batch_size": 8, "samples": 1, "mcq": True, "mcq_items": 3,
                  "kl_prompts": 3, "baselines": ["steering"], "steering": {"layer": 1}}
    data = tiny_recipe(tiny_model, evaluation=evaluation, variants=["negation"],
                       prompts={"source": "general", "train_size": 6, "eval_size": 3, "seed": 1, "validation_size": 2})
    rec = write_recipe(tmp_path / "r.yaml", data)
    run = tmp_path / "run"
    assert main(["generate", str(run), "--recipe", str(rec)]) == 0
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "prompted", "steering"]
    steer, base = metrics["models"]["steering"], metrics["models"]["base"]
    assert set(steer["conditions"]) == set(base["conditions"])
    choice = steer["steering"]
    assert choice["layer"] == 1 and choice["strength"] in steering.GRID_STRENGTHS
    assert [p["strength"] for p in choice["grid"]] == [0.0, *steering.GRID_STRENGTHS]  # base first
    assert choice["grid"][0]["kl_per_token"] == 0.0 and choice["max_kl"] == 0.1
    assert all(p["within_bound"] == (p["kl_per_token"] <= 0.1) for p in choice["grid"])
    assert isinstance(choice["qualified"], bool)
    assert steer["capability"]["kl"] != 0.0 and base["capability"]["kl"] == 0.0  # the hook is on while scoring
    assert steer["nll_ratio"] != 1.0 and steer["mcq_n"] == 3
    labels = {json.loads(line)["model_label"] for line in (run / "eval" / "answers.jsonl").read_text().splitlines()}
    assert "steering" in labels
    assert main(["report", str(run)]) == 0
    assert "| steering |" in (run / "report.md").read_text()
