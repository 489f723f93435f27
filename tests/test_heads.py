"""Tests for minituner/heads.py: feature extraction and the classification head.

Parity: training the head on cached features gives the head that training through the frozen
encoder gives (float64, 1e-10). Hand-checked positions: each pooling reads the right hidden
states under left and right padding. Invariant: apply_head leaves only the head trainable.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from minituner.heads import (
    ClassificationHead, FeatureDataset, HeadConfig, accuracy, add_head, apply_head, classification_loss,
    classify, extract_features, feature_loss,
)
from minituner.model import ModelConfig, Transformer
from minituner.protocol import applied, count_parameters
from minituner.train import TrainConfig, train
from minituner.data import Collator

FAMILIES = ["gpt2", "llama", "bert"]
V, PAD = 64, 0


def tiny(family: str, dtype=torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():  # non-trivial weights, so a wrong position shows
            p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype).eval()


def examples(n: int, seed: int = 0, K: int = 3) -> list[dict]:
    """Token sequences of lengths 2..9 (ids 1..V-1; 0 is padding) with random labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(2, 10, (), generator=g))
        out.append({"input_ids": torch.randint(1, V, (T,), generator=g),
                    "labels": torch.randint(0, K, (), generator=g)})
    return out


def test_head_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_classes"):
        HeadConfig(num_classes=1)
    with pytest.raises(ValueError, match="pooling"):
        HeadConfig(num_classes=3, pooling="max")
    with pytest.raises(ValueError, match="hidden"):
        HeadConfig(num_classes=3, hidden=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_head_freezes_everything_but_the_head(family):
    """Trainable = K*C + K (one Linear); every other parameter is frozen."""
    model = apply_head(tiny(family), HeadConfig(num_classes=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.out_proj.weight", "head.out_proj.bias"}
    assert count_parameters(model)[0] == 3 * 16 + 3
    assert applied(model) == [{"technique": "head", "config": {
        "num_classes": 3, "pooling": "last", "hidden": None, "dropout": 0.0, "freeze_base": True}}]
    with pytest.raises(ValueError, match="already has a head"):
        add_head(model, HeadConfig(num_classes=3))


def test_add_head_keeps_the_encoder_trainable_and_hidden_layer_shapes():
    """With hidden=8: C*8 + 8 + 8*K + K parameters in the head; the encoder stays trainable."""
    model = tiny("gpt2")
    total = count_parameters(model)[1]
    add_head(model, HeadConfig(num_classes=4, hidden=8))
    assert count_parameters(model) == (total + 16 * 8 + 8 + 8 * 4 + 4,) * 2
    assert applied(model)[0]["config"]["freeze_base"] is False
    assert classify(model, torch.randint(1, V, (3, 5))).shape == (3, 4)


def _expected_pooled(model, seq: torch.Tensor, pooling: str) -> torch.Tensor:
    """From the unpadded sequence alone: its last, first, or mean hidden state (C,)."""
    h = model.hidden_states(seq[None])[0]  # (T, C)
    return {"last": h[-1], "first": h[0], "mean": h.mean(0)}[pooling]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_picks_the_right_positions_under_padding(family, pooling, side):
    """Rows of lengths 3, 7, 5 padded to 7 on the left or the right: each row's logits are the
    head applied to the pooled hidden states of that row run alone (no padding at all)."""
    model = apply_head(tiny(family, torch.float64), HeadConfig(num_classes=3, pooling=pooling))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in (3, 7, 5)]
    ids = torch.full((3, 7), PAD)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, 1
    with torch.no_grad():
        got = classify(model, ids, mask)  # (3, K)
        want = torch.stack([model.head(_expected_pooled(model, s, pooling)) for s in seqs])
    # float64 throughout; 1e-6 since model.hidden_states sums "mean" in float32. A wrong
    # position changes the logits by ~0.1.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_features_match_one_sequence_at_a_time(family):
    """Batched, right-padded extraction equals each sequence pooled alone; float32 on the CPU;
    the model's train mode is restored and nothing needs gradients."""
    model = tiny(family).train()
    data = examples(11, seed=2)
    feats, labels = extract_features(model, data, pooling="mean", batch_size=4, progress=False)
    assert feats.dtype == torch.float32 and feats.shape == (11, 16) and not feats.requires_grad
    assert model.training
    model.eval()
    with torch.no_grad():
        want = torch.stack([_expected_pooled(model, ex["input_ids"], "mean") for ex in data])
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, torch.stack([ex["labels"] for ex in data]))
    with pytest.raises(ValueError, match="empty"):
        extract_features(model, [], progress=False)


def test_extract_features_runs_without_dropout():
    """With dropout 0.5 in the encoder, two extractions agree: eval mode, not train mode."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="bert", vocab_size=V, block_size=32, n_layer=2, n_head=2,
                                    n_embd=16, dropout=0.5)).train()
    data = examples(6, seed=7)
    a, _ = extract_features(model, data, pooling="first", progress=False)
    b, _ = extract_features(model, data, pooling="first", progress=False)
    assert torch.equal(a, b) and model.training


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("hidden", [None, 6])
def test_training_on_cached_features_equals_training_through_the_frozen_encoder(family, hidden):
    """Same data order (the loop's seeded permutation), same AdamW groups, same clipping: the
    head trained on cached features has the weights of the head trained through the frozen
    encoder after 6 steps (float64, atol 1e-10; only the padding of batches differs)."""
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=5e-2, warmup_steps=2, weight_decay=0.1,
                      progress=False, seed=3)
    data = examples(13, seed=4)
    model = apply_head(tiny(family, torch.float64), HeadConfig(num_classes=3, hidden=hidden))
    head = copy.deepcopy(model.head)
    start = copy.deepcopy(head.state_dict())

    train(model, data, cfg, loss_fn=classification_loss, collate_fn=Collator(PAD))
    feats, labels = extract_features(model, data, pooling="last", progress=False, dtype=torch.float64)
    train(head, FeatureDataset(feats, labels), cfg, loss_fn=feature_loss)

    for name, p in head.state_dict().items():
        assert not torch.equal(p, start[name]), f"{name} did not train"
        torch.testing.assert_close(p, model.head.state_dict()[name], rtol=0, atol=1e-10)


def test_classification_loss_is_cross_entropy_with_accuracy_metric():
    """loss = mean_i -log softmax(logits_i)[y_i]; accuracy a tensor (no host sync)."""
    model = apply_head(tiny("llama"), HeadConfig(num_classes=3))
    batch = Collator(PAD)(examples(6, seed=5))
    loss, metrics = classification_loss(model, batch)
    logits = classify(model, batch["input_ids"], batch["attention_mask"])
    logp = logits.log_softmax(-1)
    want = -sum(logp[i, int(y)] for i, y in enumerate(batch["labels"])) / 6
    torch.testing.assert_close(loss, want)
    assert isinstance(metrics["accuracy"], torch.Tensor)
    assert float(metrics["accuracy"]) == float((logits.argmax(-1) == batch["labels"]).float().mean())
    head_loss, _ = feature_loss(model.head, {"features": torch.randn(4, 16), "labels": torch.tensor([0, 1, 2, 0])})
    assert head_loss.dim() == 0


def test_accuracy_equals_a_loop_one_example_at_a_time():
    model = apply_head(tiny("gpt2"), HeadConfig(num_classes=3))
    data = examples(17, seed=6)
    with torch.no_grad():
        hits = [int(classify(model, ex["input_ids"][None]).argmax(-1)) == int(ex["labels"]) for ex in data]
    assert accuracy(model, data, pad_id=PAD, batch_size=5) == pytest.approx(sum(hits) / len(data))


def test_feature_dataset_checks_shapes():
    with pytest.raises(ValueError, match=r"features \(N, C\)"):
        FeatureDataset(torch.zeros(4, 3), torch.zeros(5))
    ds = FeatureDataset(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    assert len(ds) == 3 and torch.equal(ds[1]["features"], torch.tensor([2.0, 3.0]))
    head = ClassificationHead(2, HeadConfig(num_classes=3))
    assert F.softmax(head(ds.features), -1).shape == (3, 3)


def test_extract_features_keeps_the_data_order_when_batching_by_length():
    """Extraction batches stories of similar length together (little padding) and must hand
    the features back in the data's order: each row equals that example's own pooled state."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=40, block_size=32, n_layer=1, n_head=2,
                                    n_embd=8)).eval()
    lengths = [7, 2, 12, 3, 9, 2, 5]
    data = [{"input_ids": torch.randint(1, 40, (n,)), "labels": torch.tensor(i)} for i, n in enumerate(lengths)]
    feats, labels = extract_features(model, data, "mean", batch_size=3, pad_id=0, progress=False)
    assert labels.tolist() == list(range(len(lengths)))
    for i, ex in enumerate(data):
        with torch.no_grad():
            own = model.hidden_states(ex["input_ids"][None], pooling="mean")[0]
        assert torch.allclose(feats[i], own, atol=1e-5), i
