import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clipfast.models import ModelLoadError, ZeroShotClassifier, load_model, save_checkpoint
from clipfast.models.tokenizer import PAD_ID, CompactTokenizer

WORDS = ["a", "photo", "of", "heart", "star", "red", ".", "in", "the", "top", "left"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("clipfast-tiny")


def _images(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- tokenizer ------------------------------------------------------------------------------


def test_compact_ids_preserve_bpe_order_and_keep_pad_and_eot_at_the_ends():
    tokenizer = CompactTokenizer(WORDS, context_length=16)
    bpe = SimpleTokenizer()
    bpe_ids = sorted({i for w in WORDS for i in bpe.encode(w)})
    compact_ids = [tokenizer.encode(bpe.decode([i]).strip())[0] for i in bpe_ids]
    assert compact_ids == sorted(compact_ids) and len(set(compact_ids)) == len(compact_ids)
    assert min(compact_ids) > PAD_ID
    assert tokenizer.eot_id == tokenizer.vocab_size - 1
    assert tokenizer.sot_id == tokenizer.vocab_size - 2


def test_tokens_are_padded_and_argmax_finds_end_of_text():
    tokenizer = CompactTokenizer(WORDS, context_length=16)
    tokens = tokenizer(["a photo of a heart.", "a red star in the top left."])
    lengths = [8, 10]  # sot + words + "." + eot
    for row, length in zip(tokens, lengths):
        assert row[0] == tokenizer.sot_id
        assert row.argmax() == length - 1 and row[length - 1] == tokenizer.eot_id  # CLIP's text pooling
        assert (row[length:] == PAD_ID).all()


def test_truncation_keeps_end_of_text_last():
    tokenizer = CompactTokenizer(WORDS, context_length=5)
    row = tokenizer(["a photo of a red heart."])[0]
    assert row[-1] == tokenizer.eot_id and (row != PAD_ID).all()


def test_unknown_words_are_named():
    tokenizer = CompactTokenizer(WORDS, context_length=16)
    with pytest.raises(ValueError, match=r"\['unicorn', 'zebra'\]"):
        tokenizer(["a zebra in the unicorn"])


# --- tiny model and bundle ------------------------------------------------------------------


def test_tiny_model_encodes_world_captions(tiny):
    from clipfast.data.world import generate_world

    world = generate_world(16, seed=0)
    texts = tiny.encode_texts(world.captions)
    images = tiny.encode_images(world.images)
    assert texts.shape == images.shape == (16, 128)
    assert torch.allclose(images.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert tiny.tokenizer.vocab_size < 100  # compact, not open_clip's 49 408


def test_preprocess_accepts_uint8_and_float_and_resizes(tiny):
    images = _images(2)
    from_uint8 = tiny.preprocess(images)
    from_float = tiny.preprocess(images.float() / 255)
    assert torch.allclose(from_uint8, from_float)
    mean, std = torch.tensor(tiny.mean), torch.tensor(tiny.std)
    assert torch.allclose(from_uint8[0, :, 3, 5], (images[0, :, 3, 5] / 255 - mean) / std)
    # a 64x48 image: shorter side to 32, then centre crop to 32x32
    assert tiny.preprocess(torch.zeros(1, 3, 64, 48, dtype=torch.uint8)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        tiny.preprocess(torch.zeros(3, 32, 32))


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(tiny, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(tiny, path)
    loaded = load_model(checkpoint=str(path))
    images, texts = _images(4), ["a photo of a heart.", "a red star."]
    assert torch.equal(loaded.encode_images(images), tiny.encode_images(images))
    assert torch.equal(loaded.encode_texts(texts), tiny.encode_texts(texts))
    assert loaded.architecture == "clipfast-tiny" and loaded.vocabulary == tiny.vocabulary
    assert not [p for p in tmp_path.iterdir() if p.name != "model.pt"]  # no temporary files left


def test_checkpoint_is_readable_by_open_clip(tiny, tmp_path):
    from open_clip.model import CLIP

    from clipfast.models.tiny import tiny_model_config

    path = tmp_path / "model.pt"
    save_checkpoint(tiny, path)
    model = CLIP(**tiny_model_config("clipfast-tiny", tiny.tokenizer.vocab_size))
    open_clip.load_checkpoint(model, str(path))
    assert torch.equal(model.visual.conv1.weight, tiny.model.visual.conv1.weight)


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    del state["ln_final.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["token_embedding.weight"] = torch.zeros(7, 96)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelLoadError) as error:
        load_model("clipfast-tiny", checkpoint=str(path))
    message = str(error.value)
    assert "ln_final.weight" in message and "extra.weight" in message
    assert "token_embedding.weight (checkpoint (7, 96)" in message


def test_checkpoint_of_another_architecture_is_refused(tiny, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(tiny, path)
    with pytest.raises(ModelLoadError, match="holds a 'clipfast-tiny' model, not 'ViT-B-32'"):
        load_model("ViT-B-32", checkpoint=str(path))


def test_garbage_and_missing_checkpoints_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch or safetensors checkpoint"):
        load_model("clipfast-tiny", checkpoint=str(garbage))
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_model("clipfast-tiny", checkpoint=str(tmp_path / "missing.pt"))
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ModelLoadError, match="not a checkpoint dict"):
        load_model("clipfast-tiny", checkpoint=str(not_a_state_dict))


def test_unknown_model_and_tag_errors_say_where_to_look():
    with pytest.raises(ValueError, match=r"unknown model 'ViT-Nope'.*open_clip.list_models\(\)"):
        load_model("ViT-Nope")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for ViT-B-32; known tags: .*laion2b_s34b_b79k"):
        load_model("ViT-B-32", pretrained="nope")


def test_weights_missing_offline_fail_fast_naming_them(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"ViT-B-32 \(pretrained=laion2b_s34b_b79k\) is not in the local .*HF_HUB_OFFLINE"):
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")


# --- zero-shot ------------------------------------------------------------------------------


class _HandMadeBundle:
    """Texts embed by a lookup table; an 'image' is its own embedding (float [N, D])."""

    name = "hand-made"
    logit_scale = 10.0

    def __init__(self, text_embeddings: dict[str, list[float]]):
        self.table = text_embeddings

    def encode_texts(self, texts, normalize=True, batch_size=256):
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)

    def encode_images(self, images, normalize=True, batch_size=256):
        return torch.nn.functional.normalize(images.float(), dim=-1)


def test_zero_shot_averages_prompts_and_ranks_classes():
    bundle = _HandMadeBundle({
        "cat 1": [1.0, 0.0, 0.0], "cat 2": [1.0, 1.0, 0.0],
        "dog 1": [0.0, 0.0, 1.0], "dog 2": [0.0, 0.0, 1.0],
    })
    classifier = ZeroShotClassifier(bundle, ["cat", "dog"], prompts=lambda c: [f"{c} 1", f"{c} 2"])
    # mean of the *normalised* prompt embeddings (1, 0, 0) and (1, 1, 0) / sqrt 2, renormalised
    expected_cat = torch.nn.functional.normalize(torch.tensor([1.0 + 2**-0.5, 2**-0.5, 0.0]), dim=0)
    assert torch.allclose(classifier.class_embeddings[0], expected_cat, atol=1e-6)

    images = torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.0, 1.0], [0.0, 1.0, 0.0]])
    indices, probabilities = classifier.predict(images, k=2)
    assert indices[:, 0].tolist() == [0, 1, 0]
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3))  # two classes: top-2 is everything
    logits = classifier.logits(images)
    assert torch.allclose(logits, 10.0 * torch.nn.functional.normalize(images, dim=-1) @ classifier.class_embeddings.T)


def test_a_zero_shot_classifier_encodes_images_with_another_bundle_and_keeps_its_class_embeddings():
    """encoding_with: the repair's wrapped training model classifies with the class embeddings
    encoded once before it, and no text is encoded again."""
    table = {"cat": [1.0, 0.0, 0.0], "dog": [0.0, 0.0, 1.0]}
    classifier = ZeroShotClassifier(_HandMadeBundle(table), ["cat", "dog"], prompts=lambda c: [c])

    class Negating(_HandMadeBundle):
        def encode_texts(self, texts, normalize=True, batch_size=256):
            raise AssertionError("encoding_with must not encode text")

        def encode_images(self, images, normalize=True, batch_size=256):
            return -super().encode_images(images)

    other = classifier.encoding_with(Negating(table))
    images = torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.0, 1.0]])
    assert other.class_embeddings is classifier.class_embeddings
    assert torch.equal(other.logits(images), -classifier.logits(images))
    assert classifier.predict(images)[0][:, 0].tolist() == [0, 1]  # the original keeps its own bundle


# --- text encoding without the padding (clipfast/models/text.py) -----------------------------


@pytest.mark.parametrize("name", ["clipfast-tiny", "ViT-B-16"])
def test_text_encoded_without_padding_equals_the_full_context(name):
    """A causal tower's pooled (EOT) token never sees the padding after it: encoding up to the
    batch's last EOT gives model.encode_text's features, fp32 and bf16, for prompts of every length."""
    import copy

    from clipfast.models.text import encode_text, pooled_positions

    torch.manual_seed(0)
    bundle = load_model(name)
    texts = ["a photo of a heart.", "star", "a photo of the red star in the top left .", ""]
    tokens = bundle.tokenizer(texts)
    positions = pooled_positions(bundle.model, tokens)
    assert positions is not None and int(positions.max()) + 1 < tokens.shape[1]  # it is trimmed
    with torch.no_grad():
        assert torch.allclose(encode_text(bundle.model, tokens, normalize=True),
                              bundle.model.encode_text(tokens, normalize=True), atol=1e-5)
        # bf16: as close to the fp32 features as bf16's own full-context encode is (cosine 0.998 on
        # ViT-B-16's random weights; the two GEMM shapes round differently, so not equal to it)
        reference = bundle.model.encode_text(tokens, normalize=True)
        half = copy.deepcopy(bundle.model).to(torch.bfloat16)
        for features in (encode_text(half, tokens, normalize=True), half.encode_text(tokens, normalize=True)):
            cosine = (features.float() * reference).sum(-1)
            assert (cosine > 0.995).all(), cosine
        # one prompt alone: its own length, the same features as within the batch
        assert torch.allclose(encode_text(bundle.model, tokens[1:2]), bundle.model.encode_text(tokens[1:2]), atol=1e-5)


def test_text_towers_that_could_see_the_padding_are_encoded_whole(tiny):
    """No causal mask, or pooling at the last position: the padding can reach the pooled feature,
    so pooled_positions refuses and encode_text is the model's own."""
    import copy

    from clipfast.models.text import encode_text, pooled_positions

    tokens = tiny.tokenizer(["a photo of a heart.", "star"])
    bidirectional = copy.deepcopy(tiny.model)
    bidirectional.attn_mask = torch.zeros_like(bidirectional.attn_mask)
    last = copy.deepcopy(tiny.model)
    last.text_pool_type = "last"
    for model in (bidirectional, last):
        assert pooled_positions(model, tokens) is None
        with torch.no_grad():
            assert torch.equal(encode_text(model, tokens), model.encode_text(tokens))
