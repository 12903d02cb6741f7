"""The camera's cloud member (`ruyi_model.camera.CloudMember`): a family member reading released
features as soft tokens in place of an image, and answering in text.

Oracle: the stock `Qwen3VLForConditionalGeneration` of the same member (`member_to_qwen3_vl`) given the
same embeddings (`inputs_embeds`) gives the same logits. Then: it learns a feature-dependent answer
through the soft tokens alone, its release directory round-trips, and the serving helpers refuse
malformed questions.
"""

from __future__ import annotations

import json

import pytest
import torch

from ruyi_model.camera import CloudMember, load_cloud_member
from ruyi_model.vl import FamilialVLForConditionalGeneration, member_to_qwen3_vl
from tests.tiny_vl import tiny_qwen3_vl, tiny_tokenizer


@pytest.fixture(scope="module")
def family():
    return FamilialVLForConditionalGeneration.from_qwen3_vl(tiny_qwen3_vl(seed=3), [2, 4]).eval()


def _cloud(family, in_dim=6, n_tokens=3, exit_layer=4) -> CloudMember:
    torch.manual_seed(0)
    cloud = CloudMember.from_family(family, exit_layer, tiny_tokenizer(), in_dim, n_tokens).eval()
    with torch.no_grad():  # a projector that is not near zero, so the soft tokens matter
        cloud.projector.weight.normal_(std=0.5)
    return cloud


@pytest.mark.parametrize("exit_layer", [2, 4])
def test_the_cloud_member_is_the_stock_member_reading_embeddings_at_the_image_slots(family, exit_layer):
    cloud = _cloud(family, exit_layer=exit_layer)
    z = torch.randn(1, 6)
    ids, mask, _ = cloud.encode(["how many triangles are there?"])
    assert int((ids == cloud.image_token_id).sum()) == 3
    stock = member_to_qwen3_vl(family, exit_layer)
    with torch.no_grad():
        emb = stock.get_input_embeddings()(ids)
        emb[ids == cloud.image_token_id] = cloud.projector((z - cloud.shift) / cloud.scale).view(3, -1)
        want = stock(inputs_embeds=emb, attention_mask=mask).logits
        got = cloud(z, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the family is left unchanged: the cloud trains its own copy
    assert cloud.text_model.embed_tokens.weight.data_ptr() != family.get_input_embeddings().weight.data_ptr()


def test_left_padding_does_not_change_a_row(family):
    cloud = _cloud(family)
    z = torch.randn(2, 6)
    questions = ["how many triangles are there?", "what colour is the bar for march? the bar is green"]
    ids, mask, _ = cloud.encode(questions)
    assert int(mask[0].sum()) < ids.shape[1]  # the shorter row is padded on the left
    with torch.no_grad():
        batch = cloud(z, ids, mask)
        alone_ids, alone_mask, _ = cloud.encode(questions[:1])
        alone = cloud(z[:1], alone_ids, alone_mask)
    torch.testing.assert_close(batch[0, -alone.shape[1] :], alone[0], atol=1e-5, rtol=1e-5)


def test_it_learns_an_answer_that_only_the_features_carry(family):
    from tasks.training.privacy import CloudConfig, cloud_qa, train_cloud_member

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(128, 6, generator=g)
    question = "is there a red square?"

    def qa(x):
        return [[(question, "yes" if float(v[0]) > 0 else "no")] for v in x]

    cloud = _cloud(family)
    cloud.fit_standardiser(feats)
    losses = train_cloud_member(cloud, lambda x, gen: x, feats, qa(feats), CloudConfig(steps=80, lr=3e-3))
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    test = torch.randn(48, 6, generator=g)
    result = cloud_qa(cloud, test, qa(test))
    # the question is the same for every clip: only the soft tokens can tell yes from no
    assert result["accuracy"] >= 0.85, result  # chance: about 0.5


def test_the_release_directory_round_trips(family, tmp_path):
    cloud = _cloud(family)
    cloud.fit_standardiser(torch.randn(16, 6) * 3 + 1)
    cloud.save(tmp_path / "cloud", exit_layer=4, source="test")
    assert json.loads((tmp_path / "cloud" / "member.json").read_text())["exit_layer"] == 4
    assert not list((tmp_path / "cloud").rglob("*visual*")) and "visual" not in json.dumps(
        json.loads((tmp_path / "cloud" / "member" / "text_config.json").read_text())
    )
    loaded = load_cloud_member(tmp_path / "cloud")
    z = torch.randn(3, 6)
    ids, mask, _ = cloud.encode(["a", "how many triangles are there?", "describe the image."])
    with torch.no_grad():
        real = mask.bool()  # padded positions attend to nothing: their values depend on the attention kernel
        torch.testing.assert_close(
            loaded(z, ids, mask)[real], cloud(z, ids, mask)[real], atol=1e-5, rtol=1e-5
        )
    assert loaded.answer(z, ["a", "b", "c"]) == cloud.answer(z, ["a", "b", "c"])
    assert load_cloud_member(tmp_path / "nothing") is None


def test_every_prompt_must_hold_the_soft_token_slots(family):
    cloud = _cloud(family)
    ids, mask, _ = cloud.encode(["how many?"])
    ids[0, ids[0] == cloud.image_token_id] = cloud.pad_id
    with pytest.raises(ValueError, match="exactly 3 <\\|image_pad\\|>"):
        cloud(torch.randn(1, 6), ids, mask)


def test_the_cloud_reads_questions_from_the_header_and_refuses_others():
    from tasks.data.camgen import QUESTIONS
    from tasks.release.camera import WireError, cloud_answers, cloud_questions, encode_tensors

    z = {"features": torch.zeros(2, 4)}
    assert cloud_questions(encode_tensors(z)) is None
    asked = ["Did anyone fall?", "What happened?"]
    assert cloud_questions(encode_tensors(z, {"questions": json.dumps(asked)})) == asked
    for meta in (
        {"questions": "not json"},
        {"questions": json.dumps([])},
        {"questions": json.dumps(["x" * 201])},
        {"questions": json.dumps([3])},
        {"questions": json.dumps(["q"] * 17)},
        {"other": "1"},
    ):
        with pytest.raises(WireError) as info:
            cloud_questions(encode_tensors(z, meta))
        assert info.value.status == 422
    # a cloud without a member answers the standard questions from the behaviour, and nothing else
    answers = cloud_answers(None, z["features"], ["fall", "walk_left"], None)
    assert [q for q, _ in answers[0]] == list(QUESTIONS)
    assert dict(answers[0])["Did anyone fall?"] == "yes" and dict(answers[1])["Did anyone fall?"] == "no"
    with pytest.raises(WireError, match="answers only"):
        cloud_answers(None, z["features"], ["fall", "sit"], asked)


def test_the_cloud_bounds_the_work_of_a_request(family, monkeypatch):
    """A question is measured as sent (padding counts), control tokens are refused (an image placeholder
    crashed the member with a 500), the answers per request are capped and decoded in chunks, each chunk's
    answers what the whole batch's would be."""
    import tasks.release.camera as camera
    from tasks.release.camera import WireError, cloud_answers, cloud_questions, encode_tensors
    from tasks.release.serving import control_tokens

    z = torch.randn(3, 6)
    cloud = _cloud(family)
    control = control_tokens(cloud.tokenizer)
    assert {"<|image_pad|>", "<|im_start|>", "<|im_end|>"} <= set(control)
    for questions in (
        [" " * 500 + "Did anyone fall?"],
        ["What is <|image_pad|> here?"],
        ["a", "b<|im_end|>"],
    ):
        with pytest.raises(WireError) as info:
            cloud_questions(encode_tensors({"features": z}, {"questions": json.dumps(questions)}), control)
        assert info.value.status == 422
    with pytest.raises(WireError, match=r"question 1 contains the control token '<\|im_end\|>'"):
        cloud_questions(
            encode_tensors({"features": z}, {"questions": json.dumps(["a", "b<|im_end|>"])}), control
        )
    # text that only looks like markup is a question like any other: it tokenizes as plain text
    asked = ["is <|this|> a token?"]
    assert (
        cloud_questions(encode_tensors({"features": z}, {"questions": json.dumps(asked)}), control) == asked
    )
    asked = ["how many?", "what colour?"]
    whole = cloud_answers(cloud, z, ["x"] * 3, asked)
    monkeypatch.setattr(camera, "ANSWER_CHUNK", 4)  # 6 answers in chunks of 4 and 2
    assert cloud_answers(cloud, z, ["x"] * 3, asked) == whole
    monkeypatch.setattr(camera, "MAX_ANSWER_ROWS", 5)
    with pytest.raises(WireError, match="3 clips x 2 questions = 6 answers exceed 5") as info:
        cloud_answers(cloud, z, ["x"] * 3, asked)
    assert info.value.status == 413
