"""Florence-2's DaViT vision towers: archs ``base-fl`` / ``huge-fl``.

Oracle: timm's ``davit_base_fl`` / ``davit_huge_fl`` with random weights,
converted by our converter, must give timm's pooled pre-logits features
(``forward_head(forward_features(x), pre_logits=True)``) in our
``official=True`` forward. Key names of Florence-2 checkpoints come from our
own fixture (names as timm's ``_convert_florence2`` reads them); timm's
``checkpoint_filter_fn`` is a second oracle for them.

huge-fl at 768x768 takes about 90 s on one CPU thread (ours + timm): it runs
only with ``DAVIT_TEST_FL_768=1``; base-fl runs at 768x768 always.
"""
import functools
import importlib.util
import os
import os.path as osp
from collections import OrderedDict

import pytest
import torch

import davit_ext  # noqa: F401
from davit_ext.models.davit import DaViT
from davit_ext.weights import layouts as C

timm = pytest.importorskip('timm')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'davit_to_mmpretrain.py')
FULL = os.environ.get('DAVIT_TEST_FL_768') == '1'
# timm's backbone parameter counts (num_classes=0: the pooled-feature norm
# is kept, as our output norm).
PARAMS = {'base-fl': 90370048, 'huge-fl': 360636416}

pytestmark = pytest.mark.usefixtures('one_thread')


def _load_tool():
    spec = importlib.util.spec_from_file_location('davit_converter_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _randomise(model: torch.nn.Module) -> None:
    """Perturb every parameter (norms included) so that no tensor keeps a
    default value a wrong mapping could get away with."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.mul_(1 + 0.1 * noise).add_(0.02 * noise.roll(1))


@functools.lru_cache(maxsize=1)  # one pair in memory (huge-fl: 2.9 GB)
def _pair(arch: str, window: int):
    torch.manual_seed(0)
    ref = timm.create_model(
        f'davit_{arch.replace("-", "_")}', num_classes=0,
        window_size=window).eval()
    _randomise(ref)
    state_dict = C.convert(ref.state_dict(), 'mmpretrain')
    ours = DaViT(arch=arch, official=True, window_size=window).eval()
    ours.load_state_dict(
        {k[len('backbone.'):]: v
         for k, v in state_dict.items()}, strict=True)
    return ref, ours


# Ordered so that each (arch, window) pair is built once.
CASES = [
    ('base-fl', 12, (768, 768)),
    ('base-fl', 8, (256, 256)),
    ('base-fl', 8, (224, 320)),
    ('huge-fl', 8, (256, 256)),
    ('huge-fl', 8, (224, 320)),
    pytest.param(
        'huge-fl',
        12, (768, 768),
        marks=pytest.mark.skipif(
            not FULL, reason='about 90 s on CPU: set DAVIT_TEST_FL_768=1')),
]


@pytest.mark.parametrize('arch,window,size', CASES)
def test_fl_towers_match_timm(arch, window, size):
    ref, ours = _pair(arch, window)
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        (got, ) = ours(x)
    channels = 1024 if arch == 'base-fl' else 2048
    assert got.shape == expected.shape == (1, channels)
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    print(f'\n{arch} {size[0]}x{size[1]} window {window}: max |diff| '
          f'{diff:.3g}, max |feature| {scale:.3g}')
    assert scale > 1  # random norms: not a unit-scale LayerNorm output
    assert diff <= 1e-4 * scale


@pytest.mark.parametrize('arch', ['huge-fl', 'base-fl'])
def test_fl_parameter_counts_equal_timms(arch):
    ref, ours = _pair(arch, 8)  # the window has no parameters
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == PARAMS[arch]


def test_fl_arch_defaults():
    ours = DaViT(arch='base-fl')
    spatial = ours.stages[0].blocks[0].spatial_block.attn
    assert spatial.window_size == 12
    assert ours.stages[0].downsample.projection.kernel_size == (3, 3)
    assert ours.stages[0].downsample.projection.padding == (1, 1)
    assert ours.stages[0].blocks[0].channel_block.attn.v2


def test_fl_arch_options_and_overrides():
    small = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    plain = DaViT(arch=small)
    assert plain.stages[0].downsample.projection.kernel_size == (2, 2)
    assert not plain.stages[0].blocks[0].channel_block.attn.v2
    assert plain.stages[0].blocks[0].spatial_block.attn.window_size == 7
    fl = DaViT(arch='base-fl', window_size=8, channel_attn_v2=False)
    assert fl.stages[0].blocks[0].spatial_block.attn.window_size == 8
    assert not fl.stages[0].blocks[0].channel_block.attn.v2
    assert fl.downsample_kernel_size == 3
    custom = DaViT(
        arch=dict(small, downsample_kernel_size=3, channel_attn_v2=True))
    assert custom.stages[2].downsample.projection.kernel_size == (3, 3)
    with pytest.raises(ValueError, match='must be 2 .DaViT. or odd'):
        DaViT(arch=small, downsample_kernel_size=4)


def test_fl_mmpretrain_forward_mode_runs_any_size():
    """The default (mmpretrain-style) forward: feature maps, odd sizes."""
    model = DaViT(
        arch=dict(
            embed_dims=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            window_size=12,
            downsample_kernel_size=3,
            channel_attn_v2=True),
        out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 90, 130))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 23, 33), (2, 32, 12, 17),
                                              (2, 64, 6, 9), (2, 128, 3, 5)]


# ---------------------------------------------------------------- Florence-2
MINI = dict(embed_dims=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
# Tensors of the whole Florence-2 model outside the vision tower.
VLM_EXTRAS = {
    'image_projection': (64, 16),
    'image_proj_norm.weight': (16, ),
    'image_proj_norm.bias': (16, ),
    'image_pos_embed.row_embeddings.weight': (50, 64),
    'image_pos_embed.column_embeddings.weight': (50, 64),
    'visual_temporal_embed.pos_idx_to_embed': (100, 64),
    'language_model.model.shared.weight': (32, 16),
    'language_model.model.encoder.layers.0.fc1.weight': (64, 16),
    'language_model.lm_head.weight': (32, 16),
}


def florence2_state_dict(embed_dims=8, depths=(1, 1, 2, 1)):
    """A whole-model Florence-2 state dict with a small vision tower, keys
    spelt as in microsoft/Florence-2-*'s pytorch_model.bin."""
    gen = torch.Generator().manual_seed(0)
    sd = OrderedDict()

    def add(key, *shape):
        sd[key] = torch.randn(shape, generator=gen)

    vt = 'vision_tower.'
    for i, depth in enumerate(depths):
        c = embed_dims * 2**i
        c_in = 3 if i == 0 else c // 2
        k = 7 if i == 0 else 3
        add(f'{vt}convs.{i}.proj.weight', c, c_in, k, k)
        add(f'{vt}convs.{i}.proj.bias', c)
        c_norm = c if i == 0 else c_in  # the stem normalises after its conv
        add(f'{vt}convs.{i}.norm.weight', c_norm)
        add(f'{vt}convs.{i}.norm.bias', c_norm)
        for b in range(depth):
            for half, attn in (('spatial_block', 'window_attn'),
                               ('channel_block', 'channel_attn')):
                pre = f'{vt}blocks.{i}.{b}.{half}.'
                add(pre + 'conv1.fn.dw.weight', c, 1, 3, 3)
                add(pre + 'conv1.fn.dw.bias', c)
                add(pre + f'{attn}.norm.weight', c)
                add(pre + f'{attn}.norm.bias', c)
                add(pre + f'{attn}.fn.qkv.weight', 3 * c, c)
                add(pre + f'{attn}.fn.qkv.bias', 3 * c)
                add(pre + f'{attn}.fn.proj.weight', c, c)
                add(pre + f'{attn}.fn.proj.bias', c)
                add(pre + 'conv2.fn.dw.weight', c, 1, 3, 3)
                add(pre + 'conv2.fn.dw.bias', c)
                add(pre + 'ffn.norm.weight', c)
                add(pre + 'ffn.norm.bias', c)
                add(pre + 'ffn.fn.net.fc1.weight', 4 * c, c)
                add(pre + 'ffn.fn.net.fc1.bias', 4 * c)
                add(pre + 'ffn.fn.net.fc2.weight', c, 4 * c)
                add(pre + 'ffn.fn.net.fc2.bias', c)
    for key, shape in VLM_EXTRAS.items():
        add(key, *shape)
    return sd


def mini_fl(**kwargs):
    return DaViT(
        arch=dict(
            MINI,
            window_size=12,
            downsample_kernel_size=3,
            channel_attn_v2=True),
        official=True,
        **kwargs).eval()


def mini_timm_fl():
    return timm.models.davit.DaVit(
        depths=tuple(MINI['depths']),
        embed_dims=(8, 16, 32, 64),
        num_heads=tuple(MINI['num_heads']),
        window_size=12,
        down_kernel_size=3,
        channel_attn_v2=True,
        named_blocks=True,
        num_classes=0).eval()


def test_florence2_layout_converts_without_unmapped_keys():
    sd = florence2_state_dict()
    assert C.detect_layout(sd) == 'florence2'
    assert C.infer_num_stages(sd, 'florence2') == 4
    ignored = []
    mm = C.convert(sd, 'mmpretrain', ignored=ignored)
    assert sorted(ignored) == sorted(VLM_EXTRAS)
    tower = len(sd) - len(VLM_EXTRAS)
    assert len(mm) == tower + 2  # + the identity output norm
    assert torch.equal(mm['backbone.norm3.weight'], torch.ones(64))
    assert torch.equal(mm['backbone.norm3.bias'], torch.zeros(64))
    # Spot checks of the renaming, by value.
    pairs = {
        'vision_tower.convs.0.norm.bias':
        'backbone.patch_embed.norm.bias',
        'vision_tower.convs.2.proj.weight':
        'backbone.stages.1.downsample.projection.weight',
        'vision_tower.convs.3.norm.weight':
        'backbone.stages.2.downsample.norm.weight',
        'vision_tower.blocks.2.1.spatial_block.window_attn.fn.qkv.weight':
        'backbone.stages.2.blocks.1.spatial_block.attn.w_msa.qkv.weight',
        'vision_tower.blocks.2.1.channel_block.channel_attn.norm.bias':
        'backbone.stages.2.blocks.1.channel_block.norm1.bias',
        'vision_tower.blocks.3.0.channel_block.conv2.fn.dw.weight':
        'backbone.stages.3.blocks.0.channel_block.cpe2.proj.weight',
        'vision_tower.blocks.0.0.spatial_block.ffn.fn.net.fc2.bias':
        'backbone.stages.0.blocks.0.spatial_block.ffn.layers.1.bias',
    }
    for src, dst in pairs.items():
        assert mm[dst] is sd[src]
    model = mini_fl()
    model.load_state_dict({k[len('backbone.'):]: v
                           for k, v in mm.items()},
                          strict=True)


def test_florence2_to_timm_matches_timms_filter_and_features():
    sd = florence2_state_dict()
    ref = mini_timm_fl()
    expected_keys = timm.models.davit.checkpoint_filter_fn(sd, ref)
    ours_timm = C.convert(sd, 'timm')
    # timm's filter drops the other tensors and has no head norm.
    assert {
        k: v
        for k, v in ours_timm.items() if not k.startswith('head.norm')
    } == expected_keys
    ref.load_state_dict(ours_timm, strict=True)
    model = mini_fl()
    model.load_state_dict(
        {
            k[len('backbone.'):]: v
            for k, v in C.convert(sd, 'mmpretrain').items()
        },
        strict=True)
    x = torch.randn(2, 3, 100, 140)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        (got, ) = model(x)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    # mmpretrain -> timm writes timm's named block halves for _fl models.
    back = C.convert(C.convert(sd, 'mmpretrain'), 'timm')
    assert list(back) == list(ours_timm)
    assert 'stages.2.blocks.1.channel_block.attn.qkv.weight' in back


def test_timm_fl_round_trip_is_bit_identical():
    ref = mini_timm_fl()
    sd = ref.state_dict()
    mm = C.convert(sd, 'mmpretrain')
    back = C.convert(mm, 'timm')
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)
    off = C.convert(mm, 'official')
    assert C.convert(off, 'mmpretrain').keys() == mm.keys()


@pytest.mark.parametrize('fmt', ['bin', 'safetensors'])
def test_tool_converts_whole_florence2_files(fmt, tmp_path, capsys):
    sd = florence2_state_dict()
    if fmt == 'bin':
        src = tmp_path / 'pytorch_model.bin'
        torch.save(sd, src)
    else:
        safetensors = pytest.importorskip('safetensors.torch')
        src = tmp_path / 'model.safetensors'
        safetensors.save_file(sd, str(src))
    dst = tmp_path / 'tower.pth'
    assert tool.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    tower = len(sd) - len(VLM_EXTRAS)
    assert f'{tower} tensors, plus an identity output norm' in out
    assert f'ignored {len(VLM_EXTRAS)} other tensors' in out
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt['meta']['converted_from'] == 'florence2'
    assert ckpt['meta']['ignored_tensors'] == len(VLM_EXTRAS)
    model = mini_fl()
    model.load_state_dict(
        {k[len('backbone.'):]: v
         for k, v in ckpt['state_dict'].items()},
        strict=True)
    # --to timm: loads into timm's _fl DaVit as it is.
    assert tool.main([str(src), str(tmp_path / 't.pth'), '--to', 'timm']) == 0
    mini_timm_fl().load_state_dict(
        torch.load(tmp_path / 't.pth', weights_only=True), strict=True)


def test_tool_rejects_florence2_as_target(tmp_path, capsys):
    torch.save(florence2_state_dict(), tmp_path / 'f.bin')
    with pytest.raises(SystemExit):
        tool.main([
            str(tmp_path / 'f.bin'),
            str(tmp_path / 'o.pth'), '--to', 'florence2'
        ])
    assert "invalid choice: 'florence2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='Unknown target layout'):
        C.convert(florence2_state_dict(), 'florence2')


# florence2:// (huggingface_hub's cache, offline mode, revisions) and the
# transformers-native layout: tests/test_florence2_hf.py.

# ------------------------------------------------------- configs and hub
FL_MODELS = {
    'base-fl':
    ('davit-base-fl_florence2-pre_3rdparty', 'Florence-2-base', 1024),
    'huge-fl':
    ('davit-huge-fl_florence2-pre_3rdparty', 'Florence-2-large', 2048),
}


def _weights(repo):
    return (f'florence2://huggingface.co/microsoft/{repo}/resolve/main/'
            'pytorch_model.bin')


def test_fl_metafile_entries_and_hub_names():
    import yaml
    from mmpretrain import list_models
    from mmpretrain.apis import ModelHub
    with open(osp.join(REPO, 'configs/davit/metafile.yml')) as f:
        meta = {m['Name']: m for m in yaml.safe_load(f)['Models']}
    assert sorted(list_models('*-fl_*')) == sorted(
        name for name, _, _ in FL_MODELS.values())
    for arch, (name, repo, _) in FL_MODELS.items():
        entry = meta[name]
        assert entry['Metadata']['Parameters'] == PARAMS[arch]
        assert entry['Weights'] == _weights(repo)
        assert entry['Converted From']['Weights'] == \
            f'https://huggingface.co/microsoft/{repo}'
        assert entry['Config'] == \
            f'configs/davit/davit-{arch}_florence2-pre_headless.py'
        info = ModelHub.get(name)
        assert info.weights == _weights(repo)
        assert info.config.model.backbone.arch == arch
        assert info.config.model.backbone.official is True
        assert info.config.model['_scope_'] == 'davit_ext'


@pytest.mark.parametrize('arch', ['base-fl', 'huge-fl'])
def test_fl_finetune_configs(arch):
    from mmengine.config import Config
    _, repo, channels = FL_MODELS[arch]
    for size, window in ((768, None), (256, 8)):
        cfg = Config.fromfile(
            osp.join(REPO, 'configs', 'davit',
                     f'davit-{arch}_florence2-pre_8xb16_in1k-{size}px.py'))
        backbone = cfg.model.backbone
        assert (backbone.arch, backbone.official) == (arch, True)
        assert backbone.get('window_size') == window
        assert backbone.init_cfg == dict(
            type='Pretrained', checkpoint=_weights(repo), prefix='backbone.')
        assert cfg.model.neck is None
        assert cfg.model.head.in_channels == channels
        assert cfg.train_dataloader.dataset.pipeline[1].scale == size
        assert cfg.val_dataloader.dataset.pipeline[2].crop_size == size
        assert cfg.val_dataloader.dataset.type == 'ImageNet'


def test_fl_custom_dataset_config_builds_and_trains_a_step(tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from davit_ext.registry import MODELS
    cfg = Config.fromfile(
        osp.join(
            REPO, 'configs/davit/'
            'davit-base-fl_florence2-pre_1xb32_custom-256px.py'))
    assert cfg.train_dataloader.dataset.type == 'CustomDataset'
    assert cfg.model.backbone.window_size == 8
    assert cfg.model.head.num_classes == cfg.data_preprocessor.num_classes
    assert cfg.model.train_cfg == {}
    init_default_scope(cfg.default_scope)
    # Small arch, same config otherwise (base-fl itself: 90M parameters).
    cfg.model.backbone.arch = dict(
        MINI, downsample_kernel_size=3, channel_attn_v2=True)
    cfg.model.backbone.init_cfg = None
    cfg.model.head.in_channels = 64
    model = MODELS.build(cfg.model)
    assert model.backbone.stages[0].blocks[0].spatial_block.attn \
        .window_size == 8
    images = torch.randn(2, 3, 64, 64)
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i) for i in (1, 3)]
    loss = model(images, samples, mode='loss')['loss']
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.patch_embed.projection.weight.grad is not None
