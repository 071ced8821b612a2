"""Florence-2 as Hugging Face serves it today.

transformers' own Florence-2 (``transformers.models.florence2``, the
florence-community/* repositories) is the oracle of the transformers-native
layout: we build its vision tower (and whole model) with random weights,
save it with ``save_pretrained`` as a user's download would be, convert the
file and compare our backbone's last map with transformers' tower
(``Florence2VisionBackbone``: the last stage's map, no output norm). The
remote-code layout (microsoft/Florence-2-*) has timm as its oracle
(tests/test_florence2.py). Downloads go through huggingface_hub: its cache
layout, offline mode and revisions are exercised on a cache made here.
"""
import os.path as osp
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_florence2 import florence2_state_dict

import davit_ext  # noqa: F401
from davit_ext.errors import CheckpointDownloadError, UnknownLayoutError
from davit_ext.models.davit import DaViT
from davit_ext.weights import florence2
from davit_ext.weights import layouts as C

hf = pytest.importorskip('transformers.models.florence2')
safetensors = pytest.importorskip('safetensors.torch')
Florence2Config = hf.Florence2Config
Florence2ForConditionalGeneration = hf.Florence2ForConditionalGeneration
Florence2VisionConfig = hf.Florence2VisionConfig
Florence2VisionBackbone = hf.Florence2VisionBackbone

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# A small Florence-2 tower (Florence-2's window 12, kernel-3 downsamples,
# channel attention v2: our base-fl/huge-fl options) with several heads.
SMALL = dict(embed_dim=[16, 32, 64, 128], depths=[1, 1, 2, 1])
SMALL_HEADS = [2, 4, 8, 16]
TEXT = dict(
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    vocab_size=64,
    max_position_embeddings=64)


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter (norms included) away from its default, so that a wrong
    mapping cannot hide behind a LayerNorm of ones."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.mul_(1 + 0.1 * noise).add_(0.02 * noise.roll(1))


def _vision_config(arch: str) -> 'Florence2VisionConfig':
    if arch == 'base-fl':
        return Florence2VisionConfig()  # transformers' default: base's tower
    return Florence2VisionConfig(
        **SMALL, num_heads=SMALL_HEADS, num_groups=SMALL_HEADS)


def _ours(arch: str, **kwargs) -> DaViT:
    # The original stem's padding, maps out (no pooling): transformers'.
    kwargs = dict(dict(official=True, out_type='featmap'), **kwargs)
    if arch == 'base-fl':
        return DaViT(arch='base-fl', **kwargs).eval()
    return DaViT(
        **kwargs,
        arch=dict(
            embed_dims=SMALL['embed_dim'][0],
            depths=SMALL['depths'],
            num_heads=SMALL_HEADS,
            window_size=12,
            downsample_kernel_size=3,
            channel_attn_v2=True)).eval()


def _load(model: DaViT, path: str) -> dict:
    """Load a converted Florence-2 file strictly; into a model without an
    output norm (``norm_cfg=None``), without the identity-initialised one the
    conversion adds."""
    state_dict, info = florence2.load_vision_tower(path)
    has_norm = any(k.startswith('norm') for k in model.state_dict())
    model.load_state_dict(
        {
            k[len('backbone.'):]: v
            for k, v in state_dict.items()
            if has_norm or not k.startswith('backbone.norm')
        },
        strict=True)
    return info


def _output_norm(x: torch.Tensor) -> torch.Tensor:
    """The output LayerNorm a conversion adds (weight 1, bias 0, as timm's
    ``davit_*_fl`` keep it), on NCHW maps."""
    x = x.permute(0, 2, 3, 1)
    return F.layer_norm(x, x.shape[-1:]).permute(0, 3, 1, 2)


def _max_rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize('arch,size', [('small', (100, 140)),
                                       ('base-fl', (96, 160))])
def test_whole_transformers_model_file_equals_its_vision_tower(
        arch, size, tmp_path):
    """A Florence2ForConditionalGeneration saved by transformers (the layout of
    florence-community/Florence-2-*: ``model.vision_tower.*``) converts, and
    our last map equals transformers' tower at a non-square size."""
    cfg = Florence2Config(
        vision_config=_vision_config(arch).to_dict(),
        text_config=TEXT,
        projection_dim=16)
    ref = Florence2ForConditionalGeneration(cfg).eval()
    _randomise(ref.model.vision_tower)
    ref.save_pretrained(tmp_path)
    path = str(tmp_path / 'model.safetensors')
    ours = _ours(arch)
    info = _load(ours, path)
    tower = ref.model.vision_tower
    assert info['layout'] == 'florence2-native'
    assert info['converted'] == len(tower.state_dict())
    with safetensors.safe_open(path, 'pt') as f:
        in_file = len(list(f.keys()))  # tied weights are saved once
    assert info['ignored'] == in_file - len(tower.state_dict())
    raw = _ours(arch, norm_cfg=None)
    _load(raw, path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tower(x).last_hidden_state
        (got, ) = raw(x)
        (normed, ) = ours(x)
    # The last stage's map: (B, C, H/32, W/32), ceil for the padded sizes.
    assert expected.shape[2:] == (-(-size[0] // 32), -(-size[1] // 32))
    assert _max_rel_diff(got, expected) <= 1e-4
    # With the output norm (the default): transformers' map, normalised.
    assert _max_rel_diff(normed, _output_norm(expected)) <= 1e-4


def test_tower_only_file_and_pytorch_bin(tmp_path):
    """transformers' tower saved alone (no prefix), as safetensors and as a
    torch .bin of the same state dict, and the converter tool."""
    import importlib.util
    ref = Florence2VisionBackbone(_vision_config('small')).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / 'tower')
    torch.save(ref.state_dict(), tmp_path / 'pytorch_model.bin')
    x = torch.randn(1, 3, 64, 88)
    with torch.no_grad():
        expected = ref(x).last_hidden_state
    for path in (tmp_path / 'tower' / 'model.safetensors',
                 tmp_path / 'pytorch_model.bin'):
        ours = _ours('small', norm_cfg=None)
        info = _load(ours, str(path))
        assert (info['layout'], info['ignored']) == ('florence2-native', 0)
        with torch.no_grad():
            (got, ) = ours(x)
        assert _max_rel_diff(got, expected) <= 1e-4
    spec = importlib.util.spec_from_file_location(
        'conv_tool',
        osp.join(REPO, 'tools', 'model_converters', 'davit_to_mmpretrain.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / 'ours.pth'
    assert tool.main([str(tmp_path / 'tower' / 'model.safetensors'),
                      str(dst)]) == 0
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt['meta']['converted_from'] == 'florence2-native'
    ours = _ours('small')
    ours.load_state_dict(
        {k[len('backbone.'):]: v
         for k, v in ckpt['state_dict'].items()},
        strict=True)
    with torch.no_grad():
        (got, ) = ours(x)
    assert _max_rel_diff(got, _output_norm(expected)) <= 1e-4


def test_layout_detection_under_any_prefix():
    remote = florence2_state_dict()
    tower, _ = C.florence2_vision_tower(remote)
    assert C.find_florence2_tower(remote) == ('florence2', 'vision_tower.')
    assert C.find_florence2_tower(tower) == ('florence2', '')
    nested = {'model.' + k: v for k, v in remote.items()}
    assert C.detect_layout(nested) == 'florence2'
    assert C.infer_num_stages(nested, 'florence2') == 4
    # An mmseg decode head has convs.0.conv.weight too: not a tower.
    head = {'decode_head.convs.0.conv.weight': torch.zeros(1)}
    assert C.find_florence2_tower(head) is None
    with pytest.raises(UnknownLayoutError, match='nor a Florence-2'):
        C.detect_layout(head)
    # Two towers in one file: refused, both named.
    two = dict(nested)
    two.update(remote)
    with pytest.raises(UnknownLayoutError, match='several Florence-2'):
        C.detect_layout(two)
    with pytest.raises(UnknownLayoutError, match='No florence2-native'):
        C.convert(remote, 'mmpretrain', 'florence2-native')


# ------------------------------------------- downloads via huggingface_hub
def _put_in_hf_cache(cache,
                     repo,
                     revision_sha,
                     name,
                     state_dict,
                     branch='main'):
    """Lay a file out as huggingface_hub's cache does after a download:

    ``models--ORG--REPO/snapshots/<sha>/<file>`` and ``refs/<branch>``.
    """
    folder = cache / ('models--' + repo.replace('/', '--'))
    snapshot = folder / 'snapshots' / revision_sha
    snapshot.mkdir(parents=True, exist_ok=True)
    if isinstance(state_dict, str):  # a file to copy
        shutil.copy(state_dict, snapshot / name)
    else:
        torch.save(state_dict, snapshot / name)
    if branch:
        (folder / 'refs').mkdir(exist_ok=True)
        (folder / 'refs' / branch).write_text(revision_sha)


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """huggingface_hub offline (HF_HUB_OFFLINE=1), its cache in tmp_path."""
    from huggingface_hub import constants
    cache = tmp_path / 'hf'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def _small_classifier():
    from mmpretrain.models import ImageClassifier
    return ImageClassifier(
        backbone=dict(
            type='davit_ext.DaViT',
            arch=dict(
                embed_dims=8,
                depths=[1, 1, 2, 1],
                num_heads=[1, 2, 4, 8],
                window_size=12,
                downsample_kernel_size=3,
                channel_attn_v2=True),
            official=True,
            out_type='featmap'))


def test_scheme_reads_hf_cache_offline_at_the_pinned_revision(hf_offline):
    """florence2:// goes through huggingface_hub: a cached file is found
    offline, and the URL's revision picks the snapshot (a pinned commit and the
    branch main hold different files here)."""
    from mmengine.runner import load_checkpoint
    old, new = 'a' * 40, 'b' * 40
    remote = florence2_state_dict()
    _put_in_hf_cache(
        hf_offline, 'org/Mini', old, 'pytorch_model.bin', remote, branch=None)
    changed = {k: v + 1 for k, v in remote.items()}
    _put_in_hf_cache(hf_offline, 'org/Mini', new, 'pytorch_model.bin', changed)
    key = 'vision_tower.blocks.2.1.channel_block.channel_attn.fn.qkv.weight'
    for revision, expected in ((old, remote), ('main', changed)):
        clf = _small_classifier()
        ckpt = load_checkpoint(
            clf, 'florence2://huggingface.co/org/Mini/resolve/'
            f'{revision}/pytorch_model.bin',
            map_location='cpu',
            strict=True)
        assert ckpt['meta']['converted_from'] == 'florence2'
        assert ckpt['meta']['revision'] == revision
        assert torch.equal(
            clf.backbone.stages[2].blocks[1].channel_block.attn.qkv.weight,
            expected[key])


def test_scheme_reads_a_native_safetensors_file(hf_offline, tmp_path):
    ref = Florence2ForConditionalGeneration(
        Florence2Config(
            vision_config=dict(
                embed_dim=[8, 16, 32, 64],
                depths=[1, 1, 2, 1],
                num_heads=[1, 2, 4, 8],
                num_groups=[1, 2, 4, 8]),
            text_config=TEXT,
            projection_dim=16)).eval()
    _randomise(ref.model.vision_tower)
    ref.save_pretrained(tmp_path / 'saved')
    _put_in_hf_cache(hf_offline, 'florence-community/Mini', 'c' * 40,
                     'model.safetensors',
                     str(tmp_path / 'saved' / 'model.safetensors'))
    from mmengine.runner import load_checkpoint
    clf = _small_classifier().eval()
    ckpt = load_checkpoint(
        clf, 'florence2://huggingface.co/florence-community/Mini/resolve/'
        'main/model.safetensors',
        map_location='cpu',
        strict=True)
    assert ckpt['meta']['converted_from'] == 'florence2-native'
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        expected = ref.model.vision_tower(x).last_hidden_state
        (got, ) = clf.backbone(x)
    assert _max_rel_diff(got, _output_norm(expected)) <= 1e-4


def test_scheme_offline_without_a_copy_says_how_to_get_one(hf_offline):
    url = ('florence2://huggingface.co/microsoft/Florence-2-base/resolve/'
           'main/pytorch_model.bin')
    with pytest.raises(CheckpointDownloadError) as err:
        florence2.load_from_florence2(url)
    msg = str(err.value)
    assert msg.startswith(
        'could not fetch the Florence-2 weights https://huggingface.co/'
        'microsoft/Florence-2-base/resolve/main/pytorch_model.bin (')
    assert '"hf download microsoft/Florence-2-base pytorch_model.bin ' \
        '--revision main"' in msg
    assert ('python tools/model_converters/davit_to_mmpretrain.py '
            'pytorch_model.bin tower.pth') in msg
    assert '\n' not in msg
    # Nothing was written to the cache.
    assert not any(hf_offline.iterdir())


def test_scheme_url_errors():
    with pytest.raises(CheckpointDownloadError, match='ORG/REPO/resolve'):
        florence2.load_from_florence2('florence2://huggingface.co/x.bin')
    assert florence2.parse_url(
        'florence2://hf-mirror.com/org/Mini/resolve/refs/pr/6/model.bin') == \
        dict(host='hf-mirror.com', repo='org/Mini', revision='refs/pr/6',
             file='model.bin')


def test_get_model_pretrained_offline_says_how(hf_offline, monkeypatch):
    from mmpretrain import get_model
    with pytest.raises(CheckpointDownloadError) as err:
        get_model('davit-base-fl_florence2-pre_3rdparty', pretrained=True)
    assert str(err.value).startswith(
        'could not fetch the Florence-2 weights https://huggingface.co/'
        'microsoft/Florence-2-base/resolve/main/pytorch_model.bin (')


def test_out_type_choices():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (pooled, ) = _ours('small', out_type='avg_featmap')(x)
        (maps, ) = _ours('small')(x)
    assert pooled.shape == (1, 128) and maps.shape == (1, 128, 2, 2)
    with pytest.raises(ValueError, match="out_type must be 'featmap'"):
        DaViT(arch='tiny', out_type='cls_token')
    with pytest.raises(ValueError, match='need a LayerNorm norm_cfg'):
        DaViT(arch='tiny', out_type='avg_featmap', norm_cfg=dict(type='BN'))
