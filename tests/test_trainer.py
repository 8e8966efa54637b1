"""The training loop and the scorer on the tiny model: determinism, accumulation, masking, padding."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mola_search.errors import UserError
from mola_search.models import load_base_model, tiny_llama
from mola_search.mola import MoLAConfig, MoLAModel
from mola_search.tasks import Example, TaskData
from mola_search.train import evaluate as ev
from mola_search.train.batching import IGNORE, answer_span, collate, encode_answer, encode_example, encode_prompt
from mola_search.train.run import RunConfig, execute, prepare
from mola_search.train.trainer import TrainConfig, TrainingDiverged, answer_loss, lr_factor, train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    """The SmolLM2 tokenizer as load_base_model prepares it (pad = eos); only the tokenizer is used."""
    return load_base_model("tiny-llama-L1", dtype="fp32")[1]


def classification(n: int, seed: int = 0, choices=(" no", " yes")) -> list[Example]:
    """Prompts of different lengths; the label says whether 'alpha' occurs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 14))]
        out.append(Example("Sentence: " + " ".join(words) + "\nAnswer:", tuple(choices), int("alpha" in words)))
    return out


def generative(n: int, seed: int = 0) -> list[Example]:
    """Free-form targets of 1-6 words: micro-batches then hold different numbers of answer tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
        target = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append(Example("Repeat: " + " ".join(words) + "\nOutput:", (), -1, target=target))
    return out


def mola(tok, *, seed: int = 0, layers: int = 2, dropout: float = 0.0, aux: float = 0.01,
         random_b: bool = False) -> MoLAModel:
    base = tiny_llama(num_layers=layers, hidden_size=32, vocab_size=len(tok))
    torch.manual_seed(seed)
    config = MoLAConfig(experts=(2, 3, 4, 2)[:layers], top_k=(1, 2, 2, 2)[:layers], rank=(4,) * layers,
                        lora_dropout=dropout, aux_loss_coef=aux)
    model = MoLAModel(base, config)
    if random_b:  # B starts at zero; make the adapter matter for scoring tests
        with torch.no_grad():
            for layer in model.mola_layers.values():
                layer.lora_B.normal_(std=0.05)
    return model


def adapter_params(model: MoLAModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


# --- labels, cutoff, loss ---------------------------------------------------------------------


def test_labels_mask_the_prompt_and_cutoff_cuts_the_prompt_from_the_left(tok):
    ex = classification(1, seed=3)[0]
    enc = encode_example(tok, ex, cutoff_len=256)
    prompt, answer = encode_prompt(tok, ex.prompt), encode_answer(tok, ex.answer)
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE] * len(prompt) + answer
    assert enc.num_answer_tokens == len(answer)

    gen = generative(1, seed=1)[0]
    enc = encode_example(tok, gen, cutoff_len=256)
    answer = encode_answer(tok, gen.target) + [tok.eos_token_id]  # free-form targets end with EOS
    assert [t for t in enc.labels if t != IGNORE] == answer

    short = encode_example(tok, gen, cutoff_len=len(answer) + 3)
    assert len(short.input_ids) == len(answer) + 3
    assert short.input_ids[:3] == encode_prompt(tok, gen.prompt)[-3:]  # the prompt's END is kept
    assert short.labels == [IGNORE] * 3 + answer


def test_loss_is_on_answer_tokens_only(tok):
    batch = collate([encode_example(tok, ex, 256) for ex in generative(4, seed=2)], tok.pad_token_id)
    labels = batch["labels"]
    torch.manual_seed(0)
    logits = torch.randn(*labels.shape, 50, requires_grad=True)
    small = labels.clamp(0, 49).masked_fill(labels == IGNORE, IGNORE)  # fit a 50-token vocab
    loss = answer_loss(logits, small)
    loss.backward()
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = small[:, 1:] != IGNORE
    # gradient reaches exactly the positions whose next token is an answer token
    assert torch.equal(logits.grad.abs().sum(-1) > 0, predicts_answer)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][predicts_answer[:, :-1]],
                                               small[:, 1:][predicts_answer[:, :-1]])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_left_padding_restarts_positions_and_keeps_answers_at_the_end(tok):
    items = [encode_example(tok, ex, 256) for ex in generative(3, seed=4)]
    batch = collate(items, tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row, e in enumerate(items):
        n = len(e.input_ids)
        assert batch["input_ids"][row, width - n:].tolist() == e.input_ids
        assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert batch["position_ids"][row, width - n:].tolist() == list(range(n))
    keep = answer_span(batch)
    assert (batch["labels"][:, :-keep] == IGNORE).all()  # nothing supervised outside the kept tail


# --- the loop ---------------------------------------------------------------------------------


def test_same_seed_same_run_different_seed_different_run(tok):
    """Through execute (init, shuffling, dropout all seeded): same seed -> identical metrics on CPU."""
    data = TaskData("toy", {"train": classification(24, 1), "validation": classification(8, 2),
                            "test": classification(8, 3)}, ("toy",), "memory")

    def run(seed: int):
        config = RunConfig(task="toy", model="tiny-llama", allocation="2,3", lora_dropout=0.1,
                           train=TrainConfig(seed=seed, max_steps=3, batch_size=8, micro_batch_size=4, log_every=1))
        base = tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok))
        outcome = execute(prepare(config, base=(base, tok), data=data), progress=False, save=False)
        scores = ev.score_choices(outcome.model, tok, data.splits["validation"])
        return outcome.metrics, scores

    first, scores1 = run(0)
    again, scores2 = run(0)
    other, _ = run(1)
    assert first["train_loss_curve"] == again["train_loss_curve"]
    assert len(first["train_loss_curve"]) == 3
    assert first["aux_loss_curve"] == again["aux_loss_curve"]
    for split in ("validation", "test"):
        assert first[split]["accuracy"] == again[split]["accuracy"]
        assert math.isfinite(first[split]["accuracy"])
    assert scores1 == scores2
    assert first["train_loss_curve"] != other["train_loss_curve"]


def _capture_grads(monkeypatch) -> list[list[torch.Tensor]]:
    """Record the accumulated gradients the trainer hands to clipping, once per optimizer step."""
    seen: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def test_gradient_accumulation_matches_one_big_batch(tok, monkeypatch):
    """batch 8 as one micro-batch of 8 or four of 2: same gradients, loss and parameters (fp32, no dropout).

    Generative targets of different lengths make the token weighting matter; the balance loss is
    off because it is computed per micro-batch (its batch statistics are not additive).
    """
    examples = generative(16, seed=5)
    results = {}
    for micro in (8, 2):
        grads = _capture_grads(monkeypatch)
        model = mola(tok, aux=0.0, dropout=0.0)
        after_one = {}

        def snapshot(event, model=model, after_one=after_one):
            if event.step == 1:
                after_one.update(adapter_params(model))

        res = train(model, tok, examples, TrainConfig(max_steps=2, batch_size=8, micro_batch_size=micro,
                                                      log_every=1), callbacks=[snapshot], progress=False)
        results[micro] = (res, grads, after_one)
        monkeypatch.undo()
    (res8, grads8, params8), (res2, grads2, params2) = results[8], results[2]
    assert len(grads8) == len(grads2) == 2
    for g8, g2 in zip(grads8, grads2):
        for a, b in zip(g8, g2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads8[1])
    for (_, l8), (_, l2) in zip(res8.loss_curve, res2.loss_curve):
        assert l8 == pytest.approx(l2, abs=1e-5)
    # parameters after the first step (Adam's update amplifies float noise of near-zero gradients
    # later on, so the gradients above are the tight check for step 2)
    for key in params8:
        torch.testing.assert_close(params8[key], params2[key], atol=1e-5, rtol=0)
    assert any(not torch.equal(params8[k], mola(tok).adapter_state_dict()[k]) for k in params8)  # it moved


def test_nan_loss_raises_training_diverged(tok):
    model = mola(tok)
    with torch.no_grad():
        next(iter(model.mola_layers.values())).lora_A.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 1"):
        train(model, tok, classification(8), TrainConfig(max_steps=3, batch_size=4), progress=False)


def test_infinite_lr_diverges(tok):
    with pytest.raises(TrainingDiverged):
        train(mola(tok), tok, classification(16), TrainConfig(max_steps=4, batch_size=4, lr=float("inf")),
              progress=False)


def test_max_steps_and_epochs_decide_the_number_of_steps(tok):
    seen = []
    res = train(mola(tok), tok, classification(40), TrainConfig(max_steps=3, batch_size=4, log_every=1),
                callbacks=[lambda e: seen.append((e.step, e.total_steps))], progress=False)
    assert res.steps == 3 and seen == [(1, 3), (2, 3), (3, 3)]
    assert [s for s, _ in res.loss_curve] == [1, 2, 3]
    # more steps than one epoch holds: the data is cycled
    assert train(mola(tok), tok, classification(6), TrainConfig(max_steps=5, batch_size=4),
                 progress=False).steps == 5
    # without max_steps: ceil(examples * epochs / batch)
    assert TrainConfig(epochs=2, batch_size=4).steps_for(10) == 5
    assert TrainConfig(epochs=1, batch_size=16).steps_for(3) == 1
    res = train(mola(tok), tok, classification(10), TrainConfig(epochs=2, batch_size=4), progress=False)
    assert res.steps == 5 and res.train_tokens > 0 and res.tokens_per_second > 0


def test_callback_can_stop_training(tok):
    res = train(mola(tok), tok, classification(16), TrainConfig(max_steps=5, batch_size=4),
                callbacks=[lambda e: e.step == 2], progress=False)
    assert res.steps == 2 and res.stopped_early


def test_warmup_then_linear_decay(tok):
    total, warmup = 10, 3
    factors = [lr_factor(s, total, warmup) for s in range(total)]
    assert factors[:warmup + 1] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # rises, never starts at 0
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))  # then strictly decays
    assert factors[-1] > 0
    assert lr_factor(0, 5, 0) == 1.0  # no warmup: full lr at once
    # the loop uses it: the lr of each step, as passed to callbacks
    lrs = []
    train(mola(tok), tok, classification(16), TrainConfig(max_steps=total, batch_size=4, warmup_ratio=0.3, lr=1e-3),
          callbacks=[lambda e: lrs.append(e.lr)], progress=False)
    assert lrs == pytest.approx([1e-3 * f for f in factors])


def test_progress_bar_shows_loss_and_tokens_per_second(tok, capsys):
    train(mola(tok), tok, classification(8), TrainConfig(max_steps=2, batch_size=4), progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(micro_batch_size=0), dict(max_steps=-1),
                                 dict(epochs=0), dict(lr=-1.0), dict(cutoff_len=1), dict(warmup_ratio=1.5)])
def test_train_config_rejects_nonsense(bad):
    with pytest.raises(UserError):
        TrainConfig(**bad)


def test_zero_steps_trains_nothing(tok):
    model = mola(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, tok, classification(8), TrainConfig(max_steps=0, batch_size=4, lr=1.0), progress=False)
    assert result.steps == 0 and result.loss_curve == [] and result.train_tokens == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_no_training_examples_is_a_user_error(tok):
    with pytest.raises(UserError):
        train(mola(tok), tok, [], TrainConfig(max_steps=1), progress=False)


# --- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("choices", [(" no", " yes"), (" not at all", " yes indeed", " maybe")])
def test_left_padded_batch_scores_equal_one_by_one_scores(tok, choices):
    examples = classification(7, seed=6, choices=choices)
    assert len({len(encode_prompt(tok, ex.prompt)) for ex in examples}) > 3  # really different lengths
    model = mola(tok, random_b=True)
    batched = ev.score_choices(model, tok, examples, batch_size=8)
    single = [ev.score_choices(model, tok, [ex], batch_size=1)[0] for ex in examples]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-4)
    assert all(math.isfinite(x) for row in batched for x in row)


def test_single_token_fast_path_equals_sequence_path(tok):
    examples = classification(9, seed=7, choices=(" no", " yes", " maybe"))
    model = mola(tok, random_b=True).eval()
    choice_ids = [[encode_answer(tok, c) for c in ex.choices] for ex in examples]
    assert all(len(ids) == 1 for per in choice_ids for ids in per)
    with torch.no_grad():
        fast = ev._score_single_token(model, tok, examples, choice_ids, 4, 256)
        slow = ev._score_sequences(model, tok, examples, choice_ids, 4, 256)
    for f, s in zip(fast, slow):
        assert f == pytest.approx(s, abs=1e-4)


def test_accuracy_is_argmax_of_scores_and_leaves_train_mode_alone(tok):
    examples = classification(6, seed=8)
    model = mola(tok, random_b=True).train()
    res = ev.evaluate_accuracy(model, tok, examples, batch_size=4)
    scores = ev.score_choices(model, tok, examples)
    assert res.predictions == [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert res.accuracy == sum(p == ex.label for p, ex in zip(res.predictions, examples)) / len(examples)
    assert model.training


def test_continuous_scores_follow_from_the_choice_loglikelihoods(tok):
    """gold_logprob = log softmax over the choices at the gold one; margin = gold minus best wrong choice;
    both per example, keyed by ids that do not depend on the order the examples come in."""
    examples = classification(12, seed=9, choices=(" no", " yes", " maybe"))
    model = mola(tok, random_b=True)
    res = ev.evaluate_accuracy(model, tok, examples, batch_size=5)
    scores = ev.score_choices(model, tok, examples)
    for s, ex, gold, margin in zip(scores, examples, res.gold_logprob, res.margin):
        probs = torch.tensor(s, dtype=torch.float64).softmax(0)
        assert gold == pytest.approx(math.log(float(probs[ex.label])), abs=1e-6)
        assert margin == pytest.approx(s[ex.label] - max(v for i, v in enumerate(s) if i != ex.label), abs=1e-6)
        assert gold <= 0
    out = res.to_dict(per_example=True)
    assert out["gold_logprob"] == pytest.approx(sum(res.gold_logprob) / len(examples))
    assert out["per_example"]["correct"] == [int(p == ex.label) for p, ex in zip(res.predictions, examples)]
    shuffled = ev.evaluate_accuracy(model, tok, examples[::-1], batch_size=5)
    assert dict(zip(shuffled.ids, shuffled.gold_logprob)) == pytest.approx(dict(zip(res.ids, res.gold_logprob)))
    assert len(set(res.ids)) == len(examples)


def test_task_metrics_are_the_glue_ones():
    from sklearn.metrics import f1_score, matthews_corrcoef

    labels, preds = [1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0, 0]
    res = ev.EvalResult(4 / 7, 7, preds, labels=labels)
    # by hand: tp=2, fp=1, fn=2 -> F1 = 2*2/(2*2+1+2) = 4/7
    assert res.task_metrics("mrpc") == {"f1": pytest.approx(4 / 7)}
    assert res.task_metrics("cola") == {"mcc": pytest.approx(matthews_corrcoef(labels, preds))}
    assert res.task_metrics("rte") == {}
    assert f1_score(labels, preds) == pytest.approx(4 / 7)


LETTERS = (" A", " B", " C", " D", " E")
YES_NO = (" no", " yes")


@pytest.mark.parametrize("text, choices, expected", [
    ("The answer is B", LETTERS, 1),
    ("the answer is b.", LETTERS, 1),
    ("Answer: C", LETTERS, 2),
    ("Answer: (C)", LETTERS, 2),
    ("B.", LETTERS, 1),
    ("(D) because the others are wrong", LETTERS, 3),
    ("E", LETTERS, 4),
    ("I think option A is right", LETTERS, 0),
    ("The correct one is C, since the passage says so", LETTERS, 2),
    ("the best choice here", LETTERS, -1),           # no letter standing alone: not the "e" of "the"
    ("Not equivalent", YES_NO, 0),
    ("Equivalent", YES_NO, 1),
    ("Yes, they mean the same", YES_NO, 1),
    ("no", YES_NO, 0),
    ("The answer is yes.", YES_NO, 1),
    ("They are not paraphrases.", YES_NO, 0),
    ("I cannot tell", YES_NO, -1),
    (" yes", (" yes", " no"), 0),                    # RTE's order: yes first
    ("Entailment", (" yes", " no"), 0),
    ("The answer is: B", LETTERS, 1),
    ("Answer: B) Paris", LETTERS, 1),
    ("The correct answer is (A).", LETTERS, 0),
    ("C) The mitochondria", LETTERS, 2),
    ("Not equivalent.", YES_NO, 0),
    ("not_entailment", (" yes", " no"), 1),          # RTE's label name for "no"
    ("Unacceptable", YES_NO, 0),                      # CoLA
    ("The sentence is not grammatical.", YES_NO, 0),
    ("acceptable", YES_NO, 1),
    ("Positive.", (" negative", " positive"), 1),     # a custom task's own verbalizers
    ("The review is negative", (" negative", " positive"), 0),
])
def test_parse_choice_reads_what_models_say(text, choices, expected):
    assert ev.parse_choice(text, choices) == expected


def _uncached_greedy(model, tok, example, max_new_tokens: int) -> str:
    """The generate-mode decoder before `generate`: the whole sequence again at every step."""
    ids = torch.tensor([encode_prompt(tok, example.prompt)])
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out)


@pytest.mark.parametrize("method", ["mola", "plain", "lora", "prompt-tuning", "llama-adapter", "full"])
def test_generate_mode_decodes_as_the_uncached_loop_did(tok, method):
    """KV-cached `generate` (MoLAModel, a plain HF model, every baseline wrapper) gives the tokens the
    old full-recompute greedy loop gave, so generate-mode predictions are unchanged, only faster."""
    from mola_search.methods import build_baseline

    if method == "mola":
        model = mola(tok, random_b=True)
    elif method == "plain":
        model = tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok))
    else:
        config = RunConfig(model="tiny-llama", method=method, rank=4, lora_dropout=0.0, num_virtual_tokens=4)
        model = build_baseline(config, tiny_llama(num_layers=2, hidden_size=32, vocab_size=len(tok)))
        with torch.no_grad():  # trained-looking weights: LoRA's B and LLaMA-Adapter's gate start at zero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model.eval()
    examples = classification(5, seed=11)
    texts = ev.generate_answers(model, tok, examples, max_new_tokens=6)
    assert texts == [_uncached_greedy(model, tok, ex, 6) for ex in examples]
    assert all(texts)
    res = ev.evaluate_generation(model, tok, examples, max_new_tokens=6)
    assert res.predictions == [ev.parse_choice(t, ex.choices) for t, ex in zip(texts, examples)]


def test_activation_checkpointing_trains_to_the_same_weights(tok):
    runs = []
    for checkpointing in (False, True):
        model = mola(tok, dropout=0.1)
        config = TrainConfig(lr=1e-2, max_steps=3, batch_size=8, micro_batch_size=4, seed=3, log_every=1,
                             activation_checkpointing=checkpointing)
        result = train(model, tok, classification(24), config, progress=False)
        runs.append((result.loss_curve, result.aux_curve, adapter_params(model)))
        assert model.base_model.is_activation_checkpointing is checkpointing
    (loss, aux, weights), (loss_ck, aux_ck, weights_ck) = runs
    assert loss == loss_ck and aux == aux_ck and len(loss) == 3
    assert all(torch.equal(w, weights_ck[k]) for k, w in weights.items())


def test_activation_checkpointing_setting_is_validated():
    with pytest.raises(UserError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing="yes")


def test_padding_to_a_width_multiple_changes_no_logit(tok):
    """Batches are padded to multiples of 16 positions (fewer distinct matmul shapes); the extra left
    padding is masked and positions restart after it, so in fp32 the answer logits are the same."""
    model = mola(tok, random_b=True)
    encoded = [encode_example(tok, ex, 256) for ex in classification(5, seed=4)]
    tight, padded = collate(encoded, tok.pad_token_id, multiple=1), collate(encoded, tok.pad_token_id)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] > tight["input_ids"].shape[1]
    model.eval()
    with torch.no_grad():
        a = model(**{k: tight[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits[:, -3:]
        b = model(**{k: padded[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits[:, -3:]
    assert torch.allclose(a, b, atol=1e-5)
