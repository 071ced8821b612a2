"""Model hub and inference by name: mmpretrain's API serves our DaViT."""
import hashlib
import http.server
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import davit_ext
from davit_ext import hub

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
NAMES = [
    f'davit-{a}_3rdparty_in1k{s}' for a in ('base', 'small', 'tiny')
    for s in ('', '-official')
]
# Florence-2 towers (tests/test_florence2.py tests them).
FL_NAMES = [f'davit-{a}-fl_florence2-pre_3rdparty' for a in ('base', 'huge')]
WEIGHTS = {
    'tiny':
    'https://download.openmmlab.com/mmclassification/v0/davit/'
    'davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth',
    'small':
    'https://download.openmmlab.com/mmclassification/v0/davit/'
    'davit-small_3rdparty_in1k_20221116-51a849a6.pth',
    'base':
    'https://download.openmmlab.com/mmclassification/v0/davit/'
    'davit-base_3rdparty_in1k_20221116-19e0d956.pth',
}
PARAMS = {'tiny': 28360168, 'small': 49745896, 'base': 87954408}

# One image at a time: one thread is as fast and does not suffer from other
# processes competing for the cores.
ONE_THREAD = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')

pytestmark = pytest.mark.usefixtures('one_thread')


def run_python(code, cwd, env=None, timeout=300):
    """Run ``code`` in a fresh interpreter; return its last stdout line."""
    full_env = dict(os.environ, **ONE_THREAD, **(env or {}))
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


IMPORT_ORDERS = {
    # mmpretrain's hub already read its own index before we came.
    'mmpretrain-listed-first':
    '''
        import mmpretrain
        mmpretrain.list_models()
        import davit_ext
    ''',
    'mmpretrain-first':
    '''
        import mmpretrain
        import davit_ext
    ''',
    'davit_ext-first':
    '''
        import davit_ext
        import mmpretrain
    ''',
}


@pytest.mark.parametrize('order', list(IMPORT_ORDERS))
def test_names_resolve_to_davit_ext_whatever_the_import_order(order, tmp_path):
    code = IMPORT_ORDERS[order] + '''
        import json
        import torch
        from mmpretrain import get_model, list_models
        tiny = get_model('davit-tiny_3rdparty_in1k')
        official = get_model('davit-tiny_3rdparty_in1k-official')
        resnet = get_model('resnet18_8xb32_in1k')
        print(json.dumps(dict(
            tiny=type(tiny.backbone).__module__ + '.' +
            type(tiny.backbone).__name__,
            tiny_official=tiny.backbone.official,
            official=official.backbone.official,
            official_neck=official.with_neck,
            resnet=type(resnet.backbone).__module__,
            davit=list_models('davit'),
            swin=len(list_models('swin-tiny')))))
    '''
    out = json.loads(run_python(code, cwd=str(tmp_path)))
    assert out == dict(
        tiny='davit_ext.models.davit.DaViT',
        tiny_official=False,
        official=True,
        official_neck=False,
        resnet='mmpretrain.models.backbones.resnet',
        davit=sorted(NAMES + FL_NAMES),
        swin=out['swin'])
    assert out['swin'] >= 1  # other mmpretrain names are still there


def test_metainfo_comes_from_our_metafile():
    from mmpretrain import list_models
    from mmpretrain.apis import ModelHub
    assert list_models('davit') == sorted(NAMES + FL_NAMES)
    assert hub.model_names() == sorted(NAMES + FL_NAMES)
    root = hub.mim_root()
    for name in NAMES:
        arch = name.split('-')[1].split('_')[0]
        meta = ModelHub.get(name)
        expected_cfg = osp.join(
            root, 'configs', 'davit', f'davit-{arch}_4xb256_in1k'
            f'{"-official" if "official" in name else ""}'
            '.py')
        assert meta.config.filename == expected_cfg
        assert meta.weights == WEIGHTS[arch]
        assert meta.config.model['_scope_'] == 'davit_ext'
        assert meta.results[0].task == 'Image Classification'
    # mmpretrain's other entries are its own.
    assert 'mmpretrain' in ModelHub.get('resnet18_8xb32_in1k').config.filename


def test_unknown_name_is_mmpretrains_clear_error():
    from mmpretrain import get_model
    with pytest.raises(ValueError, match='Failed to find model "davit-x"'):
        get_model('davit-x')


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_both_modes_have_the_published_state_dict(arch):
    """Same keys and shapes as mmpretrain's own DaViT classifier (the layout of
    the published checkpoints), in both modes."""
    from mmpretrain import get_model
    mm_cfg = osp.join(
        osp.dirname(__import__('mmpretrain').__file__), '.mim', 'configs',
        'davit', f'davit-{arch}_4xb256_in1k.py')
    reference = get_model(mm_cfg)  # mmpretrain's scope: its DaViT
    standard = get_model(f'davit-{arch}_3rdparty_in1k')
    official = get_model(f'davit-{arch}_3rdparty_in1k-official')
    assert type(reference.backbone).__module__.startswith('mmpretrain.')
    state = reference.state_dict()
    for model in (standard, official):
        assert type(model.backbone) is davit_ext.models.davit.DaViT
        model.load_state_dict(state, strict=True)
        assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


def test_official_name_gives_timms_logits_standard_name_does_not():
    timm = pytest.importorskip('timm')
    from mmpretrain import get_model

    from davit_ext.weights.layouts import timm_to_mmpretrain
    torch.manual_seed(0)
    ref = timm.create_model('davit_tiny').eval()
    state = timm_to_mmpretrain(ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        logits = {}
        for suffix in ('', '-official'):
            model = get_model(f'davit-tiny_3rdparty_in1k{suffix}')
            model.load_state_dict(state, strict=True)
            logits[suffix] = model(x, mode='tensor')
    assert (logits['-official'] - expected).abs().max() < 1e-4
    assert (logits[''] - expected).abs().max() > 1e-2


def test_load_config_marks_the_scope():
    cfg = hub.load_config(
        osp.join(REPO, 'configs', 'davit', 'davit-tiny_4xb256_in1k.py'))
    assert cfg.model['_scope_'] == 'davit_ext'
    from mmpretrain import get_model
    model = get_model(cfg)
    assert type(model.backbone) is davit_ext.models.davit.DaViT


# --------------------------------------------------------------- inference
@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """An image and a checkpoint with random weights (head included), outside
    the repo; served under an OpenMMLab-style (hashed) name."""
    import cv2
    import numpy as np
    root = tmp_path_factory.mktemp('inference')
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)
    cv2.imwrite(str(root / 'dog.png'), img)
    from mmpretrain import get_model
    torch.manual_seed(0)
    state = get_model('davit-tiny_3rdparty_in1k').state_dict()
    # A non-zero head: the prediction depends on every backbone weight.
    state['head.fc.weight'] = torch.randn(1000, 768) * 0.05
    state['head.fc.bias'] = torch.randn(1000) * 0.5
    ckpt = root / 'ckpt.pth'
    torch.save({'state_dict': state, 'meta': {}}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:8]
    served = root / 'served'
    served.mkdir()
    url_name = f'davit-tiny_random_20240315-{digest}.pth'
    (served / url_name).write_bytes(ckpt.read_bytes())
    return dict(
        root=root,
        img=str(root / 'dog.png'),
        ckpt=str(ckpt),
        state=state,
        served=str(served),
        url_name=url_name)


@pytest.fixture(scope='module')
def oracle(assets):
    """What the peers predict with the same weights and image.

    Standard mode: mmpretrain's inferencer with mmpretrain's own DaViT config.
    Official mode: timm's DaViT on the very input mmpretrain's pipeline made.
    """
    timm = pytest.importorskip('timm')
    from mmpretrain.apis import ImageClassificationInferencer

    from davit_ext.weights.layouts import mmpretrain_to_timm
    mm_cfg = osp.join(
        osp.dirname(__import__('mmpretrain').__file__), '.mim', 'configs',
        'davit', 'davit-tiny_4xb256_in1k.py')
    inferencer = ImageClassificationInferencer(
        mm_cfg, pretrained=assets['ckpt'], device='cpu')
    assert type(inferencer.model.backbone).__module__.startswith('mmpretrain.')
    inputs = []
    inferencer.model.backbone.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().clone()))
    standard = inferencer(assets['img'])[0]
    ref = timm.create_model('davit_tiny').eval()
    ref.load_state_dict(mmpretrain_to_timm(assets['state']), strict=True)
    with torch.no_grad():
        official = ref(inputs[0]).softmax(-1)[0]
    out = {}
    for mode, scores in (('standard',
                          torch.as_tensor(standard['pred_scores'])),
                         ('official', official)):
        top2 = scores.topk(2)
        # the label is decided, not a near tie
        assert top2.values[0] - top2.values[1] > 1e-3, mode
        out[mode] = dict(
            pred_label=int(top2.indices[0]),
            pred_score=float(top2.values[0]),
            pred_scores=scores.tolist())
    assert standard['pred_label'] == out['standard']['pred_label']
    # the two forwards really differ: a mode mix-up cannot pass
    diff = (torch.tensor(out['standard']['pred_scores']) -
            torch.tensor(out['official']['pred_scores'])).abs().max()
    assert diff > 1e-3
    return out


def check_against(result, expected):
    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
    assert result['pred_label'] == expected['pred_label']
    assert result['pred_class'] == IMAGENET_CATEGORIES[expected['pred_label']]
    assert result['pred_score'] == pytest.approx(
        expected['pred_score'], rel=1e-4)
    if 'pred_scores' in result:
        assert torch.allclose(
            torch.tensor(result['pred_scores']),
            torch.tensor(expected['pred_scores']),
            atol=1e-5)


@pytest.fixture
def http_server(assets):
    """Serve ``assets['served']`` on localhost (a URL without internet)."""

    class Handler(http.server.SimpleHTTPRequestHandler):

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=assets['served'], **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_inference_model_by_name_outside_the_repo(assets, oracle, http_server):
    """Local file and URL, both modes, in a fresh process run elsewhere: the
    same predictions as mmpretrain (standard) and timm (official)."""
    url = f'{http_server}/{assets["url_name"]}'
    code = f'''
        import json, os
        import davit_ext
        from mmpretrain import inference_model
        assert not os.getcwd().startswith({REPO!r})
        out = {{}}
        for name in ('davit-tiny_3rdparty_in1k',
                     'davit-tiny_3rdparty_in1k-official'):
            for source in ({assets["ckpt"]!r}, {url!r}):
                r = inference_model(name, {assets["img"]!r},
                                    pretrained=source, device='cpu')
                r['pred_scores'] = r['pred_scores'].tolist()
                out[name + ' ' + source[:4]] = r
        print('RESULT', json.dumps(out))
    '''
    stdout = run_python(
        code,
        cwd=str(assets['root']),
        env=dict(TORCH_HOME=str(assets['root'] / 'torch_home')))
    # mmpretrain's inferencer may print a progress bar on the same stream.
    out = json.loads(stdout[stdout.index('RESULT ') + len('RESULT '):])
    assert len(out) == 4
    for key, result in out.items():
        assert set(result) == {
            'pred_label', 'pred_score', 'pred_class', 'pred_scores'
        }
        mode = 'official' if '-official' in key else 'standard'
        check_against(result, oracle[mode])


def test_demo_script(assets, oracle):
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'demo', 'image_demo.py'), assets['img'],
        'davit-tiny_3rdparty_in1k-official', '--pretrained', assets['ckpt'],
        '--device', 'cpu'
    ],
                          cwd=str(assets['root']),
                          env=dict(os.environ, **ONE_THREAD),
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against(
        json.loads(proc.stdout[proc.stdout.index('{'):]), oracle['official'])


def test_demo_script_bad_input(assets):
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'demo', 'image_demo.py'), assets['img'],
        'davit-huge_nonexistent'
    ],
                          cwd=str(assets['root']),
                          env=dict(os.environ, **ONE_THREAD),
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert 'Failed to find model "davit-huge_nonexistent"' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_demo_offline_download_fails_clearly(assets):
    """No --pretrained: the metafile URL, which cannot be fetched here (a dead
    proxy makes sure of that even on a machine with network)."""
    dead = 'http://127.0.0.1:9'
    env = dict(
        os.environ,
        **ONE_THREAD,
        TORCH_HOME=str(assets['root'] / 'offline_home'),
        HTTPS_PROXY=dead,
        https_proxy=dead,
        HTTP_PROXY=dead,
        http_proxy=dead,
        NO_PROXY='',
        no_proxy='')
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'demo', 'image_demo.py'), assets['img'],
        'davit-tiny_3rdparty_in1k'
    ],
                          cwd=str(assets['root']),
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert f'could not download checkpoint {WEIGHTS["tiny"]}' in proc.stderr
    assert 'pass the local file as --pretrained /path/to/checkpoint.pth' \
        in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_get_model_pretrained_true_offline_gives_one_clear_error(offline_hub):
    """``import davit_ext`` alone routes mmpretrain's loading through ours."""
    from mmpretrain import get_model

    from davit_ext.errors import CheckpointDownloadError

    with pytest.raises(CheckpointDownloadError) as err:
        get_model('davit-tiny_3rdparty_in1k', pretrained=True)
    msg = str(err.value)
    name = 'davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth'
    assert msg.startswith('could not download checkpoint https://download.'
                          f'openmmlab.com/mmclassification/v0/davit/{name}')
    assert f"inference_model(..., pretrained='/path/to/{name}')" in msg
    assert 'its sha256 must start with 700fdf7d' in msg
