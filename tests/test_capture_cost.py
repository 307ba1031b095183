"""Capture cost (issue 16, point 6): one torch.export capture serves train and eval where the graphs differ only
by dropout / batch-norm / drop-path mode (the eval graph derived from the train graph, checked against the eager
model), with a fallback to a second capture otherwise; and `dynamic=True` keeps batch and sequence dynamic but
image geometry static."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neat_fx
from neat_fx import capture as cap

import zoo
from helpers import max_diff


@pytest.fixture
def exports(monkeypatch):
    """Counts the calls of torch.export.export."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def calls(graph, name: str) -> list:
    """The nodes calling the op of schema name `name` (e.g. "aten::dropout")."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.name == name
    ]


def op_args(graph, name: str, index: int) -> list:
    """The `index`-th argument of every call of op `name` in the graph."""
    return [n.args[index] for n in calls(graph, name)]


def dropout_p(node) -> float:
    """sdpa's dropout_p, positional or keyword."""
    return node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)


def random_ops(graph) -> Counter:
    """Ops that draw random numbers (dropout included)."""
    return Counter(
        str(n.target)
        for n in graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in n.target.tags
    )


class Regularised(nn.Module):
    """Every flippable kind: batch norm 2-D and 1-D (tracked), batch norm without running stats, dropout,
    feature (2-D) and alpha dropout, F.dropout(training=self.training), sdpa with dropout_p in training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop2d = nn.Dropout2d(0.2)
        self.bn1 = nn.BatchNorm1d(8)
        self.untracked = nn.BatchNorm1d(8, track_running_stats=False)
        self.alpha = nn.AlphaDropout(0.1)
        self.drop = nn.Dropout(0.3)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.drop2d(F.relu(self.bn(self.conv(x))))  # (B, 8, H, W)
        t = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        h = t.mean(1)
        h = self.alpha(self.untracked(self.bn1(h)))
        h = F.dropout(h, 0.25, training=self.training)
        return self.head(self.drop(h))


def warmed(model, x, steps=3):
    """The model with running statistics that differ from any batch's (so eval ≠ train numerics)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x * 2 + 1)
    return model.eval()


def test_eval_graph_derived_from_train_graph(exports):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    model = warmed(Regularised(), x)
    c = cap.capture(model, (x,), {}, method="export", modes=("train", "eval"))
    assert len(exports) == 1, "one capture serves both modes"
    train, ev = c["train"].graph, c["eval"].graph
    assert c["eval"].derived and c["eval"].owner is c["train"].owner
    # structure, counted: every dropout of the train graph is there in eval mode, none trains
    for op in ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout"):
        assert op_args(train, op, 2) and all(op_args(train, op, 2)), op
        assert op_args(ev, op, 2) == [False] * len(op_args(train, op, 2)), op
    assert [dropout_p(n) for n in calls(train, "aten::scaled_dot_product_attention")] == [0.1]
    assert [dropout_p(n) for n in calls(ev, "aten::scaled_dot_product_attention")] == [0.0]
    # batch norm: tracked ones on running statistics, the untracked one on batch statistics as in eager eval
    assert op_args(train, "aten::batch_norm", 5) == [True, True, True]
    assert op_args(ev, "aten::batch_norm", 5) == [False, False, True]
    assert not op_args(ev, "aten::add_", 0), "eval does not count batch-norm steps"
    assert len(op_args(train, "aten::add_", 0)) == 2

    # numbers: the transformed module in eval mode is the eager model in eval mode, on another batch
    nm = neat_fx.transform(model, ["head"], (x,))
    assert len(exports) == 2  # transform captured once too
    other = torch.randn(7, 3, 6, 6)
    nm.eval()
    counter = model.bn.num_batches_tracked.clone()
    with torch.no_grad():
        got, want = nm(other), model(other)
        assert torch.equal(nm(other), got), "eval is deterministic"
    assert max_diff(got, want) <= 1e-5
    assert torch.equal(model.bn.num_batches_tracked, counter)
    # the train graph still trains: random dropout, batch statistics, counted steps
    nm.train()
    with torch.no_grad():
        assert not torch.equal(nm(other), nm(other))
    assert int(model.bn.num_batches_tracked) == int(counter) + 2
    nm.eval()


def hf_drop_path(x, drop_prob: float, training: bool):
    """transformers' drop_path (BEiT, Swin, ConvNeXt, …)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


def timm_drop_path(x, drop_prob: float, training: bool):
    """timm's drop_path (and torchvision's stochastic depth): a Bernoulli mask scaled by 1/keep."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


class Residual(nn.Module):
    def __init__(self, drop_path):
        super().__init__()
        self.drop_path = drop_path
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.drop_path(torch.tanh(self.a(x)), 0.2, self.training)
        x = x + self.drop_path(self.drop(torch.tanh(self.b(x))), 0.3, self.training)
        return self.head(x)


@pytest.mark.parametrize("drop_path", [hf_drop_path, timm_drop_path], ids=["hf", "timm"])
def test_drop_path_removed_in_derived_eval_graph(exports, drop_path):
    torch.manual_seed(1)
    model = Residual(drop_path).eval()
    x = torch.randn(3, 5, 16)
    nm = neat_fx.transform(model, ["a", "b"], (x,))
    assert len(exports) == 1
    assert random_ops(nm.graph("train"))  # training draws the masks
    assert set(random_ops(nm.graph("eval"))) == {"aten.dropout.default"}  # eval: no mask, dropout in eval mode
    assert op_args(nm.graph("eval"), "aten::dropout", 2) == [False]
    nm.eval()
    other = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert max_diff(nm(other), model(other)) <= 1e-6


class NoisyInTraining(nn.Module):
    """`if self.training:` adds noise: random draws that are not dropout — the eval graph must be captured."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h + 0.5 * torch.randn_like(h)
        return self.head(torch.relu(h))


class OtherOpInTraining(nn.Module):
    """A deterministic training-only branch (a different op): only the numeric check can see it."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.drop(self.a(x))
        h = torch.clamp(h, -0.05, 0.05) if self.training else torch.tanh(h)
        return self.head(h)


class AlwaysDropout(nn.Module):
    """Monte-Carlo dropout: F.dropout(training=True) in eval mode too (nondeterministic: check=False)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.dropout(self.a(x), 0.5, training=True))


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("kind", [NoisyInTraining, OtherOpInTraining])
def test_training_branch_gets_its_own_eval_capture(exports, kind, check):
    torch.manual_seed(2)
    model = kind().eval()
    x = torch.randn(4, 6, 8)
    nm = neat_fx.transform(model, ["a"], (x,), check=check)
    assert len(exports) == 2, "the eval graph was captured, not derived"
    nm.eval()
    other = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert max_diff(nm(other), model(other)) <= 1e-6
    if kind is NoisyInTraining:
        assert random_ops(nm.graph("train")) and not random_ops(nm.graph("eval"))


def test_dropout_hard_wired_to_train_stays_random_in_eval(exports):
    """check=False has no reference from transform; the derivation computes its own, so a dropout that is on in
    eval mode too is not switched off."""
    torch.manual_seed(3)
    model = AlwaysDropout().eval()
    x = torch.randn(4, 8)
    nm = neat_fx.transform(model, ["a"], (x,), check=False)
    assert len(exports) == 2
    assert op_args(nm.graph("eval"), "aten::dropout", 2) == [True]
    nm.eval()
    with torch.no_grad():
        assert not torch.equal(nm(x), nm(x))


# ---------------------------------------------------------------- dynamic defaults


def test_default_dynamic_dims_rule():
    ids = torch.zeros(2, 8, dtype=torch.long)
    seqs = cap.sequence_lengths([ids, torch.randn(2, 8, 32), torch.randn(2, 3, 32, 32)])
    assert seqs == {8}
    rule = lambda t: cap.default_dynamic_dims(t, seqs)  # noqa: E731
    assert rule(ids) == [0, 1]  # ids, masks, labels: batch and sequence
    assert rule(torch.ones(2, 8, dtype=torch.bool)) == [0, 1]
    assert rule(torch.randn(2, 16000)) == [0, 1]  # raw audio (batch, time)
    assert rule(torch.randn(2, 8, 32)) == [0, 1]  # inputs_embeds / hidden states: features static
    assert rule(torch.randn(2, 3, 32, 32)) == [0]  # images: channels, height, width static
    assert rule(torch.ones(2, 1, 8, 8, dtype=torch.bool)) == [0, 2, 3]  # a 4-D attention mask
    assert rule(torch.randn(2, 4, 8, 8)) == [0, 2, 3]  # an additive per-head bias
    assert cap.default_dynamic_dims(torch.randn(2, 4, 8, 8)) == [0]  # without sequence inputs: an image
    assert rule(torch.zeros(2, dtype=torch.long)) == [0]  # one label per example
    assert rule(torch.tensor(1.0)) == []
    spec = cap.auto_dynamic_shapes(None, (), dict(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), n=3))
    assert set(spec) == {"input_ids", "pixel_values", "n"} and spec["n"] is None
    assert sorted(spec["input_ids"]) == [0, 1] and sorted(spec["pixel_values"]) == [0]
    everything = cap.auto_dynamic_shapes(None, (torch.randn(2, 3, 32, 32),), {}, every_dim=True)
    assert sorted(everything[0]) == [0, 1, 2, 3]
    with pytest.raises(neat_fx.ConfigError, match="dynamic must be True"):
        neat_fx.transform(zoo.HomeGrown(), ["w_in"], (torch.randn(2, 3, 16),), dynamic="batch")


def test_text_model_batch_and_sequence_stay_dynamic():
    model, _, _, patterns = zoo.bert()
    model.eval()
    g = torch.Generator().manual_seed(5)
    example = dict(input_ids=torch.randint(0, 120, (2, 8), generator=g), attention_mask=torch.ones(2, 8, dtype=int))
    nm = neat_fx.transform(model, patterns, example).eval()
    other = dict(input_ids=torch.randint(0, 120, (3, 11), generator=g), attention_mask=torch.ones(3, 11, dtype=int))
    other["attention_mask"][0, 6:] = 0
    with torch.no_grad():
        assert max_diff(nm(**other).logits, model(**other).logits) <= 1e-5


def test_image_geometry_static_by_default_dynamic_with_all():
    torch.manual_seed(6)
    model = zoo.SmallCNN().eval()
    nm = neat_fx.transform(model, ["head"], (torch.randn(2, 3, 32, 32),)).eval()
    with torch.no_grad():
        five = torch.randn(5, 3, 32, 32)
        assert max_diff(nm(five), model(five)) <= 1e-5  # another batch size
        with pytest.raises(neat_fx.InputMismatchError, match=r"'x' dimension 2 is 40.*32"):
            nm(torch.randn(2, 3, 40, 40))  # another image size: static
    every = neat_fx.transform(model, ["head"], (torch.randn(2, 3, 32, 32),), dynamic="all").eval()
    with torch.no_grad():
        big = torch.randn(3, 3, 40, 40)
        assert max_diff(every(big), model(big)) <= 1e-5
    static = neat_fx.transform(model, ["head"], (torch.randn(2, 3, 32, 32),), dynamic=False).eval()
    with pytest.raises(neat_fx.InputMismatchError):
        with torch.no_grad():
            static(five)
