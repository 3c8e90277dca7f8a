"""BLIP VQA judge: tiny offline checkpoint, T2I-CompBench's yes/no probabilities recomputed independently,
batching invariance, multiple choice (likelihood and TIFA's sentence-embedding path)."""

import numpy as np
import pytest
import torch

from silmm.backends.base import CheckpointError
from silmm.eval.scorers import blip_vqa as B


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return B.build_tiny_blip_vqa(tmp_path_factory.mktemp("blip") / "vqa", seed=0)


@pytest.fixture(scope="module")
def judge(ckpt):
    return B.BlipVQA.load(ckpt)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (40 + 8 * i, 50, 3), dtype=np.uint8) for i in range(3)]


QUESTIONS = [["a red apple?", "A blue cup.", "is there a wooden bench?"], ["three dogs?"], ["a (fluffy) cat!"]]


def test_round_trip_keeps_weights_and_blip_token_conventions(ckpt, judge):
    again = B.BlipVQA.load(ckpt)
    for (k, a), (_, b) in zip(judge.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    tok = judge.tokenizer
    assert tok.bos_token == "[DEC]" and judge.bos_id == tok.bos_token_id
    assert judge.enc_token_id == tok.convert_tokens_to_ids("[ENC]")
    assert judge.sep_id == tok.sep_token_id and judge.pad_id == tok.pad_token_id
    assert tok.convert_ids_to_tokens([judge.yes_id, judge.no_id]) == ["yes", "no"]
    ids = tok("a red apple?")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert judge.recipe_notes == ["images resized to 32, T2I-CompBench uses 480"]


def test_pre_question_matches_blip():
    assert B.pre_question('A "Red" apple (big)!?') == "a red apple big?"
    assert B.pre_question("x " * 60).split() == ["x"] * 50


def _independent_yes_no(judge, image, question):
    """One question, straight from the processor and the three sub-models, float64 softmax."""
    m, proc = judge.model, judge.processor
    inputs = proc(images=[image], text=[B.pre_question(question)], return_tensors="pt")
    ids = inputs["input_ids"].clone()
    ids[:, 0] = judge.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        img = m.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        q = m.text_encoder(input_ids=ids, attention_mask=inputs["attention_mask"], encoder_hidden_states=img,
                           encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
        dec = torch.tensor([[judge.tokenizer.bos_token_id]])
        logits = m.text_decoder(input_ids=dec, encoder_hidden_states=q,
                                encoder_attention_mask=inputs["attention_mask"]).logits[0, 0]
    p = torch.softmax(logits.double(), -1)
    return p[judge.tokenizer.convert_tokens_to_ids("yes")].item(), p[judge.tokenizer.convert_tokens_to_ids("no")].item()


def test_yes_no_equals_independent_computation_from_logits(judge, images):
    got = judge.yes_no(images, QUESTIONS, batch_size=4)
    for image, qs, (p_yes, p_no) in zip(images, QUESTIONS, got, strict=True):
        assert p_yes.shape == p_no.shape == (len(qs),)
        for j, q in enumerate(qs):
            y, n = _independent_yes_no(judge, image, q)
            assert p_yes[j] == pytest.approx(y, rel=1e-5) and p_no[j] == pytest.approx(n, rel=1e-5)
        ratio = B.yes_ratio(p_yes, p_no)
        np.testing.assert_allclose(ratio, p_yes / (p_yes + p_no))
        assert np.all((ratio > 0) & (ratio < 1))


def test_batching_gives_the_same_numbers_as_one_at_a_time(judge, images):
    batched = judge.yes_no(images, QUESTIONS, batch_size=16)
    small = judge.yes_no(images, QUESTIONS, batch_size=1)
    single = [judge.yes_no([im], [[q]], batch_size=1)[0] for im, qs in zip(images, QUESTIONS, strict=True) for q in qs]
    flat = [(y, n) for p_yes, p_no in batched for y, n in zip(p_yes, p_no, strict=True)]
    for (y, n), (sy, sn) in zip(flat, single, strict=True):
        assert y == pytest.approx(sy[0], rel=1e-5) and n == pytest.approx(sn[0], rel=1e-5)
    for (a, b), (c, d) in zip(batched, small, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5)
        np.testing.assert_allclose(b, d, rtol=1e-5)


def test_images_are_encoded_once_per_call(judge, images, monkeypatch):
    calls = []
    real = judge.model.vision_model.forward
    monkeypatch.setattr(judge.model.vision_model, "forward",
                        lambda *a, **k: calls.append(k["pixel_values"].shape[0]) or real(*a, **k))
    judge.yes_no(images, QUESTIONS, batch_size=2)
    assert sum(calls) == len(images)


def test_empty_and_mismatched_inputs(judge, images):
    out = judge.yes_no(images[:2], [[], ["a cup?"]])
    assert out[0][0].shape == (0,) and out[1][0].shape == (1,)
    with pytest.raises(ValueError, match="2 images but 1"):
        judge.yes_no(images[:2], [["a cup?"]])


def _independent_log_likelihood(judge, image, question, choice):
    m, tok = judge.model, judge.tokenizer
    inputs = judge.processor(images=[image], text=[B.pre_question(question)], return_tensors="pt")
    ids = inputs["input_ids"].clone()
    ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
    answer = [tok.bos_token_id] + tok(choice, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    with torch.no_grad():
        img = m.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        q = m.text_encoder(input_ids=ids, attention_mask=inputs["attention_mask"], encoder_hidden_states=img,
                           encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
        logits = m.text_decoder(input_ids=torch.tensor([answer]), encoder_hidden_states=q,
                                encoder_attention_mask=inputs["attention_mask"]).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(logp[t, answer[t + 1]].item() for t in range(len(answer) - 1))


def test_choose_by_likelihood_picks_the_independently_most_likely_choice(judge, images):
    mcs = [[("what color is the cup?", ["red", "blue", "green", "light brown"]), ("how many dogs?", ["one", "two"])],
           [],
           [("what is it?", ["a cat", "a wooden bench", "a dog"])]]
    got = judge.choose(images, mcs, batch_size=2)
    assert judge.choice_method == "likelihood"
    for image, qs, picks in zip(images, mcs, got, strict=True):
        assert len(picks) == len(qs)
        for (question, choices), (pick, method) in zip(qs, picks, strict=True):
            lls = [_independent_log_likelihood(judge, image, question, c) for c in choices]
            assert method == "likelihood" and pick == choices[int(np.argmax(lls))]
            states, mask = judge.question_states(judge.encode_images([image]), [question])
            np.testing.assert_allclose(judge.choice_log_likelihoods(states, mask, choices), lls, rtol=1e-5)


def test_answer_is_free_form_text(judge, images):
    out = judge.answer(images, [["what color is the cup?"], [], ["a dog?", "a cat?"]])
    assert [len(a) for a in out] == [1, 0, 2] and all(isinstance(a, str) for a in out[2])


def test_choose_with_a_sentence_embedding_checkpoint_follows_tifa(ckpt, images, tmp_path):
    from transformers import BertConfig, BertModel

    tok = B.build_tiny_blip_tokenizer(tmp_path / "sbert")
    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp_path / "sbert")
    judge = B.BlipVQA.load(ckpt, sbert_path=tmp_path / "sbert")
    mcs = [[("what color is the cup?", ["red", "blue", "green"])], [], []]
    [[(pick, method)]], free = judge.choose(images, mcs)[:1], judge.answer(images, [["what color is the cup?"], [], []])
    assert method == "sbert"
    tok_s, model_s = judge.sbert

    def embed(texts):  # mean pooling over real tokens, L2-normalised (tifascore/mc_sbert.py)
        enc = tok_s(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model_s(**enc).last_hidden_state.double()
        m = enc["attention_mask"][..., None].double()
        e = (h * m).sum(1) / m.sum(1)
        return e / e.norm(dim=1, keepdim=True)

    choices = ["red", "blue", "green"]
    assert pick == choices[int(torch.argmax(embed(choices) @ embed([free[0][0]]).T))]


def test_image_size_override_interpolates_position_embeddings(ckpt, images):
    judge = B.BlipVQA.load(ckpt, image_size=48)
    assert judge.interpolate and judge.encode_images(images[:1]).shape[1] == (48 // 8) ** 2 + 1
    assert judge.yes_no(images[:1], [["a cup?"]])[0][0].shape == (1,)


def test_missing_or_malformed_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        B.BlipVQA.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'half'}.*preprocessor_config.json"):
        B.BlipVQA.load(tmp_path / "half")
