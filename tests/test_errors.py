"""Bad input: each a clear error that names the thing and the fix, nothing half-built."""

import pytest
import torch
from torch import nn

import neat_fx

import zoo


@pytest.fixture(scope="module")
def bert():
    return zoo.bert()


def test_pattern_with_no_match_lists_candidates(bert):
    model, example, _, _ = bert
    with pytest.raises(neat_fx.PatternError) as err:
        neat_fx.transform(model, ["*q_proj"], example)
    msg = str(err.value)
    assert "'*q_proj' matches no linear weight" in msg
    assert "bert.encoder.layer.0.attention.self.query.weight" in msg
    # nothing was frozen by the failed call
    assert all(p.requires_grad for p in model.parameters())


def test_pattern_matching_non_linear_parameters_says_so(bert):
    model, example, _, _ = bert
    with pytest.raises(neat_fx.PatternError, match=r"LayerNorm.weight is 1-D \(32,\)"):
        neat_fx.transform(model, ["*attention.output.LayerNorm"], example)
    with pytest.raises(neat_fx.PatternError, match="word_embeddings.weight is used by .*embedding"):
        neat_fx.transform(model, ["*word_embeddings"], example)


def test_non_2d_parameter():
    model, example, _, _ = zoo.cnn()
    with pytest.raises(neat_fx.PatternError, match=r"features.0.weight is 4-D \(8, 3, 3, 3\), NEAT needs a 2-D"):
        neat_fx.transform(model, ["features.0"], example)


def test_star_selects_every_linear_weight(bert):
    model, example, _, _ = bert
    nm = neat_fx.transform(model, "*", example, rank=2)
    linear_weights = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {s.name.removesuffix(".weight") for s in nm.sites()} == linear_weights
    for p in model.parameters():
        p.requires_grad_(True)


def test_exclude_and_regex(bert):
    model, example, _, _ = bert
    nm = neat_fx.transform(
        model, [r"re:.*layer\.\d\.attention\.self\.(query|value)"], example, exclude=["*layer.1.*"], rank=2
    )
    assert [s.name for s in nm.sites()] == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.value.weight",
    ]
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(neat_fx.PatternError, match="exclude pattern '\\*nothing\\*' matches no linear weight"):
        neat_fx.transform(model, ["*query"], example, exclude=["*nothing*"])
    with pytest.raises(neat_fx.PatternError, match="not a valid regular expression"):
        neat_fx.transform(model, ["re:(unclosed"], example)


def test_trainable_errors(bert):
    model, example, _, _ = bert
    with pytest.raises(neat_fx.PatternError, match="trainable pattern 'head\\*' matches no parameter"):
        neat_fx.transform(model, ["*query"], example, trainable=["head*"])
    with pytest.raises(neat_fx.PatternError, match="both adapted and trained in full"):
        neat_fx.transform(model, ["*query"], example, trainable=["*layer.0.attention.self.query.weight"])


def test_example_inputs_that_do_not_fit(bert):
    model, example, _, _ = bert
    with pytest.raises(neat_fx.CaptureError, match="does not run on the example inputs"):
        neat_fx.transform(model, ["*query"], {"input_ids": torch.randn(2, 5)})
    with pytest.raises(neat_fx.CaptureError, match="does not run on the example inputs"):
        neat_fx.transform(model, ["*query"], {"token_ids": example["input_ids"]})
    with pytest.raises(neat_fx.CaptureError, match="example_inputs is required"):
        neat_fx.transform(model, ["*query"])
    with pytest.raises(neat_fx.ConfigError, match="must be a torch.nn.Module"):
        neat_fx.transform(lambda x: x, ["*"], (torch.randn(2),))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return -self.proj(x)


def test_uncapturable_model_names_the_line_and_alternative():
    model = DataDependent()
    with pytest.raises(neat_fx.CaptureError) as err:
        neat_fx.transform(model, ["proj"], (torch.randn(3, 4),))
    msg = str(err.value)
    assert "data-dependent" in msg and "if x.sum() > 0" in msg and "torch.cond" in msg
    # Neither alternative route helps with a branch on tensor values, so neither is offered:
    assert "capture='fx'" not in msg and "dynamic=False" not in msg
    with pytest.raises(neat_fx.CaptureError, match="symbolic_trace could not capture"):
        neat_fx.transform(model, ["proj"], (torch.randn(3, 4),), capture="fx")


def test_call_with_other_inputs_than_captured(bert):
    model, example, other, _ = bert
    nm = neat_fx.transform(model, ["*query"], example, rank=2)
    with pytest.raises(neat_fx.InputMismatchError, match=r"captured with inputs \(input_ids, attention_mask\)"):
        nm(
            input_ids=other["input_ids"],
            attention_mask=other["attention_mask"],
            labels=torch.zeros(3, dtype=torch.long),
        )
    for p in model.parameters():
        p.requires_grad_(True)


def test_dtype_change_after_capture_is_refused():
    model, example, other, patterns = zoo.home_grown()
    nm = neat_fx.transform(model, patterns, example)
    with pytest.raises(neat_fx.ConfigError, match="cannot change dtype after capture"):
        nm.to(torch.float16)
    with pytest.raises(neat_fx.ConfigError, match="cannot change dtype"):
        nm.bfloat16()
    assert model.w_in.dtype == torch.float32
    model.half()  # behind nm's back: caught at the next call
    with pytest.raises(neat_fx.ConfigError, match="changed dtype"):
        nm(*other)


def test_batch_size_one_warns():
    model, example, other, patterns = zoo.home_grown()
    with pytest.warns(UserWarning, match="batch size 1"):
        neat_fx.transform(model, patterns, (example[0][:1],))


def test_fold_and_merge_reject_other_objects():
    with pytest.raises(TypeError, match="NeatModule"):
        neat_fx.fold(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="NeatModule"):
        neat_fx.merge_into(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="NeatModule"):
        neat_fx.save_adapters(nn.Linear(2, 2), "x")


def test_one_config_per_call_no_silent_ignores():
    """A config and an option beside it would silently drop the option: refused, naming it; the config is frozen
    and changes through dataclasses.replace (validated again)."""
    import dataclasses

    model, example, other, patterns = zoo.home_grown()
    cfg = neat_fx.NeatConfig(patterns=patterns, rank=4)
    for extra in ({"rank": 16}, {"scale": 0.5}, {"patterns": ["w_in"]}, {"exclude": ["w_mid"]}):
        with pytest.raises(neat_fx.ConfigError, match=f"{next(iter(extra))} given beside config="):
            neat_fx.transform(model, example_inputs=example, config=cfg, **extra)
    assert all(p.requires_grad for p in model.parameters()), "nothing was changed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 16
    with pytest.raises(neat_fx.ConfigError, match="rank must be a positive integer"):
        dataclasses.replace(cfg, rank=0)
    with pytest.raises(neat_fx.ConfigError, match="config must be a neat_fx.NeatConfig"):
        neat_fx.transform(model, example_inputs=example, config={"rank": 4})
    nm = neat_fx.transform(model, example_inputs=example, config=dataclasses.replace(cfg, rank=2), modes=None)
    assert nm.neat_config.rank == 2 and nm.adapters["w_in"].rank == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "x"])
def test_scale_must_be_a_finite_number(value):
    with pytest.raises(neat_fx.ConfigError, match="scale must be a"):
        neat_fx.NeatConfig(patterns=("*",), scale=value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"optimize": "max"}, "optimize must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"quantize": "int2"}, "quantize must be one of"),
        ({"quantize": "int4", "block_size": 48}, "block_size must be one of"),
        ({"quantize": "int8", "dtype": "fp16"}, "quantize='int8' applies to fp32"),
        ({"via": "tf"}, "via must be one of"),
        ({"opset": "18"}, "opset must be"),
        ({"verify": 1}, "verify must be True or False"),
        ({"dynamic": "yes"}, "dynamic must be"),
        ({"verify_inputs": {"x": 1}}, "verify_inputs must be a list"),
        ({"task": "text-classification"}, "other tasks are Optimum's, with via='optimum'"),
        ({"via": "optimum", "dtype": "fp16"}, "via='optimum' exports fp32"),
        ({"via": "optimum", "quantize": "int8"}, "via='optimum' exports fp32"),
        ({"via": "optimum", "approximate": True}, "via='optimum' exports fp32"),
    ],
)
def test_export_options_validated_in_one_place(options, message):
    from neat_fx.export import ExportConfig

    with pytest.raises(neat_fx.ConfigError, match=message):
        ExportConfig(**options)
