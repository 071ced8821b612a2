"""Safe checkpoint loading: allowlist, refusal without side effects, clear
errors, download integrity (HTTP served from 127.0.0.1), mmengine routing."""
import functools
import hashlib
import http.server
import io
import os
import os.path as osp
import socket
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

import davit_ext  # noqa: F401
from davit_ext import errors as E
from davit_ext import weights as C


@pytest.fixture(autouse=True)
def _own_torch_home(tmp_path, monkeypatch):
    """Downloads go to the test's folder, never the user's torch hub cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


class _MkdirPayload:
    """Unpickling it would create ``path`` (the side effect to look for)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path, ))


class _GetattrPayload:
    """Pickles as ``getattr(HistoryBuffer, name)``: only the statistics methods
    mmengine pickles this way may load."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return (getattr, (HistoryBuffer, self.name))


def _runner_like_checkpoint():
    """What mmengine's runner writes (HistoryBuffer, numpy arrays/scalars)."""
    buf = HistoryBuffer()
    for v in (0.5, 0.25, 0.125):
        buf.update(v)
    return {
        'meta': {
            'epoch': 2,
            'iter': 8,
            'seed': 0,
            'dataset_meta': {
                'classes': ('0', '1')
            }
        },
        'state_dict': OrderedDict(w=torch.arange(6.).reshape(2, 3)),
        'message_hub': {
            'log_scalars': {
                'train/loss': buf
            },
            'runtime_info': {
                'eta': np.float64(1.5),
                'iter': 8
            },
            'resumed_keys': {
                'eta': False
            }
        },
        'optimizer': {
            'state': {},
            'param_groups': [{
                'lr': 1e-3,
                'betas': (0.9, 0.999)
            }]
        },
    }


def test_runner_checkpoint_loads_with_its_types(tmp_path):
    path = str(tmp_path / 'epoch_2.pth')
    torch.save(_runner_like_checkpoint(), path)
    ckpt = C.load_checkpoint_file(path)
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.data[0].tolist() == [0.5, 0.25, 0.125]
    assert buf.mean() == pytest.approx(0.875 / 3)
    assert ckpt['message_hub']['runtime_info']['eta'] == np.float64(1.5)
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(6.).reshape(2, 3))
    assert ckpt['meta']['dataset_meta']['classes'] == ('0', '1')


def test_allowlist_is_explicit():
    names = sorted(
        e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}'
        for e in C.allowed_globals())
    assert names == [
        'builtins.getattr',
        'mmengine.logging.history_buffer.HistoryBuffer',
        'numpy._core.multiarray._reconstruct',
        'numpy._core.multiarray.scalar',
        'numpy.core.multiarray._reconstruct',
        'numpy.core.multiarray.scalar',
        'numpy.dtype',
        'numpy.dtypes.Float32DType',
        'numpy.dtypes.Float64DType',
        'numpy.dtypes.Int32DType',
        'numpy.dtypes.Int64DType',
        'numpy.ndarray',
    ]
    getattr_standin = dict((e[1], e[0]) for e in C.allowed_globals()
                           if isinstance(e, tuple))['builtins.getattr']
    assert getattr_standin is not getattr


def test_malicious_checkpoint_refused_without_side_effect(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': _MkdirPayload(str(marker))}, path)
    with pytest.raises(E.UnsafeCheckpointError) as err:
        C.load_checkpoint_file(path)
    assert not marker.exists()
    msg = str(err.value)
    assert msg.startswith(f'refused to load checkpoint {path}: it contains '
                          'a pickled object')
    assert 'posix.mkdir' in msg
    assert 'Nothing from the file was executed' in msg


def test_plain_foreign_class_is_refused_not_called_corrupt(tmp_path):
    """A class torch refuses (no reduce payload) is named as unsafe."""
    import argparse
    path = str(tmp_path / 'namespace.pth')
    torch.save({'state_dict': {}, 'args': argparse.Namespace(a=1)}, path)
    with pytest.raises(E.UnsafeCheckpointError) as err:
        C.load_checkpoint_file(path)
    assert 'not allowed: argparse.Namespace' in str(err.value)


def test_getattr_is_only_history_buffer_statistics(tmp_path):
    path = str(tmp_path / 'getattr.pth')
    torch.save({'f': _GetattrPayload('__init__')}, path)
    with pytest.raises(E.UnsafeCheckpointError) as err:
        C.load_checkpoint_file(path)
    assert ('getattr(mmengine.logging.history_buffer.HistoryBuffer, '
            "'__init__') is not allowed") in str(err.value)
    # the statistics methods do load, as mmengine's checkpoints need
    torch.save({'f': _GetattrPayload('mean')}, path)
    assert C.load_checkpoint_file(path)['f'] is HistoryBuffer.mean


def test_missing_truncated_and_foreign_files(tmp_path):
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(E.CheckpointNotFoundError) as err:
        C.load_checkpoint_file(missing)
    assert str(err.value) == (
        f'checkpoint {missing!r} does not exist (looked in {missing!r}). '
        'Check the path, or give an http(s) URL of a published checkpoint.')

    buf = io.BytesIO()
    torch.save(_runner_like_checkpoint(), buf)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    with pytest.raises(E.CorruptCheckpointError) as err:
        C.load_checkpoint_file(str(truncated))
    assert str(err.value).startswith(
        f'cannot read checkpoint {truncated}: the file is truncated, '
        'damaged or not a torch checkpoint (PytorchStreamReader failed')
    assert 'resume from an earlier epoch_N.pth' in str(err.value)

    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(E.CorruptCheckpointError):
        C.load_checkpoint_file(str(empty))
    with pytest.raises(E.CheckpointNotFoundError, match='is a folder'):
        C.load_checkpoint_file(str(tmp_path))


def test_state_dict_fit_check():
    """The strict policy (resume, test, export): every mismatch listed."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    good = {
        'state_dict': {
            'module.0.weight': torch.zeros(2, 3),
            '0.bias': torch.zeros(2)
        }
    }
    fit = C.fit_pretrained(model, good, 'good.pth', strict=True)
    assert fit.loaded == ['0.weight', '0.bias'] and not fit.kept
    bad = {
        'state_dict': {
            '0.weight': torch.zeros(4, 3),
            'head.fc.bias': torch.zeros(4)
        }
    }
    with pytest.raises(E.CheckpointMismatchError) as err:
        C.fit_pretrained(model, bad, 'bad.pth', 'M', strict=True)
    assert str(err.value) == (
        'checkpoint bad.pth does not fit M: 1 key(s) of M are missing: '
        '0.bias; 1 key(s) are not in M: head.fc.bias; 1 shape mismatch(es): '
        '0.weight (checkpoint (4, 3), model (2, 3)). Use a checkpoint saved '
        'from this config (same arch and num_classes); DaViT weights in the '
        'timm or official layout must be converted first '
        '(tools/model_converters/davit_to_mmpretrain.py).')
    # fine-tuning: a new head is fine, nothing shared is not
    net = torch.nn.Module()
    net.backbone = torch.nn.Linear(3, 2)
    net.head = torch.nn.Linear(2, 5)
    part = {
        'backbone.weight': torch.zeros(2, 3),
        'backbone.bias': torch.zeros(2),
        'head.weight': torch.zeros(7, 2)
    }
    fit = C.fit_pretrained(net, part, 'part.pth')
    assert fit.loaded == ['backbone.weight', 'backbone.bias']
    assert fit.kept_keys == ['head.weight', 'head.bias']
    with pytest.raises(E.CheckpointMismatchError, match='none of its 1 keys'):
        C.fit_pretrained(net, {'x': torch.zeros(1)}, 'other.pth')


def test_install_routes_mmengine_loading(tmp_path):
    from mmengine.runner import load_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader
    C.install()
    assert C.is_installed()
    assert CheckpointLoader._get_checkpoint_loader('x.pth') is \
        C.load_from_local
    marker = tmp_path / 'payload_ran'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': _MkdirPayload(str(marker))}, path)
    with pytest.raises(E.UnsafeCheckpointError):
        load_checkpoint(torch.nn.Linear(3, 2), path)
    assert not marker.exists()
    # and a runner checkpoint loads through mmengine's API
    path = str(tmp_path / 'ok.pth')
    ckpt = _runner_like_checkpoint()
    ckpt['state_dict'] = torch.nn.Linear(3, 2).state_dict()
    torch.save(ckpt, path)
    model = torch.nn.Linear(3, 2)
    load_checkpoint(model, path, strict=True)
    assert torch.equal(model.weight, ckpt['state_dict']['weight'])


# --------------------------------------------------------------------------
# Downloads, served from 127.0.0.1 inside the test
# --------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path):
    """(folder served over HTTP, base URL); the server stops afterwards."""
    root = tmp_path / 'served'
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


def _publish(root, stem, payload, hash_of=None, date='20240315'):
    """Save ``payload`` as OpenMMLab's ``stem_<date>-<sha8>.pth``; the name's
    hash is that of ``hash_of`` bytes if given (a tampered file)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(hash_of if hash_of is not None else data)
    name = f'{stem}_{date}-{digest.hexdigest()[:8]}.pth'
    (root / name).write_bytes(data)
    return name, data


def _bytes(payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


WEIGHTS = {'state_dict': {'w': torch.ones(3)}, 'meta': {'note': 'ok'}}


def test_download_verifies_openmmlab_sha256(http_dir, tmp_path):
    root, base = http_dir
    cache = str(tmp_path / 'cache')
    good, _ = _publish(root, 'good', WEIGHTS)
    ckpt = C.load_checkpoint_file(f'{base}/{good}', cache_dir=cache)
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(3))
    assert os.listdir(cache) == [good]  # cached under its own name only

    bad, data = _publish(root, 'bad', WEIGHTS, hash_of=b'something else')
    with pytest.raises(E.CheckpointIntegrityError) as err:
        C.load_checkpoint_file(f'{base}/{bad}', cache_dir=cache)
    expected = bad[-len('12345678.pth'):-len('.pth')]
    assert str(err.value) == (
        f'checkpoint {base}/{bad} failed its integrity check: its name says '
        f'the sha256 starts with {expected}, the downloaded file\'s sha256 '
        f'is {hashlib.sha256(data).hexdigest()}. The downloaded file was '
        f'removed and not loaded (nothing was written to '
        f'{osp.join(cache, bad)}). Try again; if this persists, the server '
        'or a proxy serves a different file: fetch it from the original '
        'source and pass the local path instead.')
    assert sorted(os.listdir(cache)) == [good]  # our download: removed


def test_mismatching_file_in_the_cache_is_kept(http_dir, tmp_path):
    """A file in the cache may be the user's (the offline advice is to copy it
    there): refused, never deleted, and the message says what to do."""
    root, base = http_dir
    cache = tmp_path / 'cache'
    cache.mkdir()
    good, _ = _publish(root, 'good', WEIGHTS)
    users = _bytes({'state_dict': {'w': torch.zeros(3)}})
    (cache / good).write_bytes(users)
    with pytest.raises(E.CheckpointIntegrityError) as err:
        C.load_checkpoint_file(f'{base}/{good}', cache_dir=str(cache))
    path = str(cache / good)
    assert str(err.value) == (
        f'checkpoint {base}/{good}: the file found at {path} does not '
        f'match: its name says the sha256 starts with {good[-12:-4]}, the '
        f'file\'s sha256 is {hashlib.sha256(users).hexdigest()}. It was not '
        'loaded and was left where it is. If you copied it there, it is not '
        'the published file: copy the right one over it (offline: fetch it '
        'on a machine with network first), or pass the path of a file you '
        'trust instead of the URL. To download it again instead, delete '
        f'{path} and run again.')
    assert (cache / good).read_bytes() == users  # kept, unchanged


@pytest.mark.parametrize(
    'name', ['davit-tiny-20240315.pth', 'model-1a2b3c4d.pth', 'plain.pth'])
def test_names_without_a_known_hash_load(http_dir, tmp_path, name):
    """Only OpenMMLab's ``_<YYYYMMDD>-<hex>.pth`` promises a hash: a date (or
    torch hub's ``-<hex>``) in an arbitrary URL is not one."""
    from mmengine.runner import load_checkpoint
    root, base = http_dir
    model = torch.nn.Linear(3, 2)
    (root / name).write_bytes(_bytes({'state_dict': model.state_dict()}))
    assert C.expected_sha256(f'{base}/{name}') is None
    cache = str(tmp_path / 'cache')
    ckpt = C.load_checkpoint_file(f'{base}/{name}', cache_dir=cache)
    assert torch.equal(ckpt['state_dict']['weight'], model.weight)
    # and through mmengine, which every model in the process uses
    other = torch.nn.Linear(3, 2)
    load_checkpoint(other, f'{base}/{name}', strict=True)
    assert torch.equal(other.weight, model.weight)


def test_date_named_url_through_get_model(http_dir, tmp_path, monkeypatch):
    """The false refusal of the issue: ``pretrained=<date-named URL>``."""
    from mmpretrain import get_model
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    root, base = http_dir
    state = get_model('davit-tiny_3rdparty_in1k').state_dict()
    state['head.fc.bias'] += 1.5
    name = 'davit-tiny-20240315.pth'
    (root / name).write_bytes(_bytes({'state_dict': state}))
    model = get_model('davit-tiny_3rdparty_in1k', pretrained=f'{base}/{name}')
    assert torch.equal(model.head.fc.bias, state['head.fc.bias'])


def test_user_given_sha256(http_dir, tmp_path):
    root, base = http_dir
    name = 'mine.pth'
    data = _bytes(WEIGHTS)
    (root / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    cache = str(tmp_path / 'cache')
    url = f'{base}/{name}'
    # a URL fragment (works wherever a URL does, e.g. get_model) ...
    with pytest.raises(
            E.CheckpointIntegrityError,
            match="the URL's #sha256 fragment says the sha256 "
            'starts with 00000000'):
        C.load_checkpoint_file(f'{url}#sha256=00000000', cache_dir=cache)
    assert os.listdir(cache) == []
    ckpt = C.load_checkpoint_file(
        f'{url}#sha256={digest[:12]}', cache_dir=cache)
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(3))
    # ... or an argument, for URLs and local files (never deleted)
    local = osp.join(cache, name)
    with pytest.raises(E.CheckpointIntegrityError) as err:
        C.load_checkpoint_file(local, sha256='ABCDEF01')
    assert str(err.value) == (
        f'checkpoint {local}: the sha256 passed starts with abcdef01, the '
        f'file\'s sha256 is {digest}. It was not loaded and was left where '
        'it is: check that it is the file you meant, or pass the right hash.')
    assert open(local, 'rb').read() == data
    assert C.load_checkpoint_file(
        local, sha256=digest)['meta'] == {
            'note': 'ok'
        }
    with pytest.raises(E.CheckpointIntegrityError, match='not 8 to 64 hex'):
        C.load_checkpoint_file(url, sha256='xyz', cache_dir=cache)


def test_sha256_from_our_model_index(monkeypatch, http_dir, tmp_path):
    from types import SimpleNamespace

    from davit_ext.weights import index
    root, base = http_dir
    url = f'{base}/fl-tower.pth'
    (root / 'fl-tower.pth').write_bytes(_bytes(WEIGHTS))
    entry = SimpleNamespace(
        name='fl-tower',
        weights=url,
        metadata=SimpleNamespace(data={'SHA256': 'ABCD1234' * 8}))
    monkeypatch.setattr(index, '_models', {'fl-tower': entry})
    assert C.expected_sha256(url) == ('abcd1234' * 8,
                                      "davit_ext's model index (fl-tower)")
    with pytest.raises(
            E.CheckpointIntegrityError,
            match=r"davit_ext's model index \(fl-tower\) says"):
        C.load_checkpoint_file(url, cache_dir=str(tmp_path / 'c'))


def test_get_model_pretrained_true_keeps_a_users_mismatching_file(offline_hub):
    """Offline, the advice is to copy the file into the cache; a wrong copy is
    refused with what to do and stays where the user put it."""
    from mmpretrain import get_model

    tmp_path = offline_hub
    name = 'davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth'
    users = tmp_path / 'checkpoints' / name
    users.parent.mkdir()
    users.write_bytes(_bytes({'state_dict': {}}))
    before = users.read_bytes()
    with pytest.raises(E.CheckpointIntegrityError) as err:
        get_model('davit-tiny_3rdparty_in1k', pretrained=True)
    msg = str(err.value)
    assert f'the file found at {users} does not match: its name says the ' \
        'sha256 starts with 700fdf7d' in msg
    assert 'It was not loaded and was left where it is.' in msg
    assert 'offline: fetch it on a machine with network first' in msg
    assert users.read_bytes() == before


def test_download_through_mmengine_and_torch_hub_cache(http_dir, tmp_path,
                                                       monkeypatch):
    from mmengine.runner import load_checkpoint
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    root, base = http_dir
    model = torch.nn.Linear(3, 2)
    name, _ = _publish(root, 'linear', {'state_dict': model.state_dict()})
    C.install()
    other = torch.nn.Linear(3, 2)
    load_checkpoint(other, f'{base}/{name}', strict=True)
    assert torch.equal(other.weight, model.weight)
    assert osp.isfile(
        osp.join(str(tmp_path / 'torch_home'), 'hub', 'checkpoints', name))


def test_offline_download_fails_with_one_clear_message(tmp_path):
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    name = 'davit-tiny_20240315-0123abcd.pth'
    url = f'http://127.0.0.1:{port}/{name}'
    cache = str(tmp_path / 'cache')
    with pytest.raises(E.CheckpointDownloadError) as err:
        C.load_checkpoint_file(url, cache_dir=cache)
    msg = str(err.value)
    assert msg.startswith(f'could not download checkpoint {url}: ')
    assert 'Connection refused' in msg
    assert ('fetch the file on another machine and pass its local path '
            'instead of the URL') in msg
    assert (f'or copy it to {osp.join(cache, name)} '
            '(its sha256 must start with 0123abcd)') in msg
    assert os.listdir(cache) == []  # no partial file left


def test_expected_sha256_prefix():
    url = ('https://download.openmmlab.com/mmclassification/v0/davit/'
           'davit-tiny_3rdparty_in1k_20221116-700fdf7d.pth')
    assert C.expected_sha256_prefix(url) == '700fdf7d'
    assert C.expected_sha256(url) == ('700fdf7d', 'its name')
    for other in ('http://h/model.pth', 'http://h/model-XYZ12345.pth',
                  'http://h/davit-tiny-20240315.pth',
                  'http://h/model-1a2b3c4d.pth'):
        assert C.expected_sha256_prefix(other) is None, other


# --------------------------------------------------------------------------
# Every scheme of mmengine's CheckpointLoader goes through the safe loader
# --------------------------------------------------------------------------


class _FakeResponse(io.BytesIO):
    """What ``urllib.request.urlopen`` returns, for URLs served in memory."""

    def __init__(self, data):
        super().__init__(data)
        self.headers = {'Content-Length': str(len(data))}

    def info(self):
        import email.message
        meta = email.message.Message()
        meta['Content-Length'] = str(len(self.getvalue()))
        return meta


@pytest.fixture
def fake_web(monkeypatch, tmp_path):
    """{url: bytes} served by a patched urlopen (https has no loopback
    certificate); anything else is offline. Downloads cache in tmp_path."""
    import urllib.error
    import urllib.request
    pages = {}

    def urlopen(request, timeout=None):
        url = getattr(request, 'full_url', request)
        if url not in pages:
            raise urllib.error.URLError('offline (test)')
        return _FakeResponse(pages[url])

    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
    monkeypatch.setattr(torch.hub, 'urlopen', urlopen)  # torch's downloads
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    return pages


def _sha8(data):
    return hashlib.sha256(data).hexdigest()[:8]


def _scheme_torchvision(data, monkeypatch, **_):
    from mmengine.runner import checkpoint as mm
    url = f'https://example.invalid/tiny-{_sha8(data)}.pth'
    monkeypatch.setattr(mm, 'get_torchvision_models', lambda: {'tiny': url})
    return url, 'torchvision://tiny'


def _scheme_modelzoo(data, monkeypatch, **_):
    url, _ = _scheme_torchvision(data, monkeypatch)
    return url, 'modelzoo://tiny'


def _scheme_mmcls(data, monkeypatch, **_):
    from mmengine.runner import checkpoint as mm
    url = f'https://example.invalid/tiny_20240315-{_sha8(data)}.pth'
    monkeypatch.setattr(mm, 'get_mmcls_models', lambda: {'tiny': url})
    return url, 'mmcls://tiny'


def _scheme_open_mmlab_file(data, monkeypatch, tmp_path, **_):
    """No monkeypatching: mmengine's own $MMENGINE_HOME/open_mmlab.json."""
    home = tmp_path / 'mmengine_home'
    home.mkdir(parents=True, exist_ok=True)
    (home / 'open_mmlab.json').write_text('{"mine": "mine.pth"}')
    (home / 'mine.pth').write_bytes(data)
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    return None, 'open-mmlab://mine'


def _scheme_openmmlab_url(data, monkeypatch, tmp_path, **_):
    home = tmp_path / 'mmengine_home'
    home.mkdir(parents=True, exist_ok=True)
    url = f'https://example.invalid/mine-{_sha8(data)}.pth'
    (home / 'open_mmlab.json').write_text(f'{{"mine": "{url}"}}')
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    return url, 'openmmlab://mine'


def _scheme_https(data, monkeypatch, **_):
    url = 'https://example.invalid/weights.pth'
    return url, url


def _scheme_pavi(data, monkeypatch, **_):
    import sys
    import types

    class Model:
        name = 'weights.pth'

        def download(self, path):
            with open(path, 'wb') as f:
                f.write(data)

    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=lambda path: Model())
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    return None, 'pavi://project/weights.pth'


def _ceph(prefix):

    def scheme(data, monkeypatch, **_):
        from mmengine import fileio
        seen = []

        class Backend:

            def get(self, filepath):
                seen.append(filepath)
                return data

        from mmengine.runner import checkpoint as mm
        for module in (fileio, mm):  # mmengine's loader imported it by name
            monkeypatch.setattr(module, 'get_file_backend',
                                lambda *a, **k: Backend())
        return None, f'{prefix}bucket/weights.pth'

    return scheme


SCHEMES = {
    'torchvision://': _scheme_torchvision,
    'modelzoo://': _scheme_modelzoo,
    'mmcls://': _scheme_mmcls,
    'open-mmlab:// (file)': _scheme_open_mmlab_file,
    'openmmlab:// (url)': _scheme_openmmlab_url,
    'https://': _scheme_https,
    'pavi://': _scheme_pavi,
    's3://': _ceph('s3://'),
    'cluster1:s3://': _ceph('cluster1:s3://'),
    'petrel://': _ceph('petrel://'),
}


@pytest.mark.parametrize('scheme', list(SCHEMES))
def test_every_scheme_loads_safely(scheme, fake_web, monkeypatch, tmp_path):
    """Through mmengine's CheckpointLoader: the weights load, and a file that
    would run code is refused (nothing runs) on every scheme."""
    from mmengine.runner.checkpoint import CheckpointLoader
    C.install()
    good = _bytes({'state_dict': {'backbone.w': torch.arange(3.)}})
    url, filename = SCHEMES[scheme](
        good, monkeypatch=monkeypatch, tmp_path=tmp_path)
    if url:
        fake_web[url] = good
    ckpt = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    key = 'w' if scheme == 'mmcls://' else 'backbone.w'  # mmcls strips it
    assert torch.equal(ckpt['state_dict'][key], torch.arange(3.))

    marker = tmp_path / 'payload_ran'
    evil = _bytes({'state_dict': {}, 'x': _MkdirPayload(str(marker))})
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'evil_home'))
    url, filename = SCHEMES[scheme](
        evil, monkeypatch=monkeypatch, tmp_path=tmp_path / 'evil')
    if url:
        fake_web[url] = evil
    with pytest.raises(E.UnsafeCheckpointError, match='posix.mkdir'):
        CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    assert not marker.exists()


def test_published_table_hash_is_checked(fake_web):
    """torchvision's table names carry a sha256 start: a different file is
    refused (and, being our download, removed)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    C.install()
    url = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
    fake_web[url] = _bytes(WEIGHTS)
    with pytest.raises(E.CheckpointIntegrityError) as err:
        CheckpointLoader.load_checkpoint('torchvision://resnet18')
    assert str(err.value).startswith(
        f'checkpoint {url} failed its integrity check: its name in '
        "torchvision's model table says the sha256 starts with f37072fd")
    cache = osp.join(torch.hub.get_dir(), C.CACHE_SUBDIR)
    assert os.listdir(cache) == []


def test_unknown_table_name_is_one_clear_error(fake_web):
    from mmengine.runner.checkpoint import CheckpointLoader
    C.install()
    with pytest.raises(E.CheckpointNotFoundError) as err:
        CheckpointLoader.load_checkpoint('torchvision://resnet_nope')
    assert str(err.value) == (
        "checkpoint torchvision://resnet_nope: torchvision's model table has "
        "no model named 'resnet_nope'. Check the name, or pass a local path "
        'or an http(s) URL.')


def test_other_schemes_are_refused_and_uninstall_restores(tmp_path):
    from mmengine.runner import checkpoint as mm
    from mmengine.runner.checkpoint import CheckpointLoader
    calls = []

    def foreign(filename, map_location=None):
        calls.append(filename)
        return {}

    CheckpointLoader.register_scheme('foreign://', foreign, force=True)
    try:
        C.install()
        assert C.is_installed()
        with pytest.raises(E.UnknownSchemeError) as err:
            CheckpointLoader.load_checkpoint('foreign://x.pth')
        assert calls == []
        assert str(err.value) == (
            'refused to load checkpoint foreign://x.pth: its scheme '
            "'foreign://' is served by test_checkpoint.test_other_schemes_are"
            '_refused_and_uninstall_restores.<locals>.foreign, which '
            'davit_ext cannot check loads with weights_only=True. Download '
            'the file yourself and pass its local path, or, if you trust '
            'that loader, call davit_ext.weights.uninstall() (or set '
            'DAVIT_EXT_DISABLE=checkpoint before importing davit_ext).')
        C.uninstall()
        assert not C.is_installed()
        # mmengine's own loaders, and the foreign one, are back
        assert CheckpointLoader._schemes[''] is mm.load_from_local
        assert CheckpointLoader._schemes['mmcls://'] is mm.load_from_mmcls
        assert CheckpointLoader.load_checkpoint('foreign://x.pth') == {}
        assert calls == ['foreign://x.pth']
    finally:
        CheckpointLoader._schemes.pop('foreign://', None)
        C.install()
    assert C.is_installed()


# --------------------------------------------------------------------------
# HistoryBuffer: no class state from a file
# --------------------------------------------------------------------------


def _crafted_history_buffer(path):
    """A checkpoint whose HistoryBuffer maps ``mean`` to ``max`` and adds a
    method: mmengine's ``__setstate__`` copies that into the class dict."""
    buf = HistoryBuffer()
    buf.update(1.0)
    buf.update(3.0)
    methods = HistoryBuffer._statistics_methods
    saved = dict(methods)
    try:
        methods['mean'] = HistoryBuffer.max
        methods['evil'] = HistoryBuffer.min
        torch.save({'message_hub': {'log_scalars': {'loss': buf}}}, path)
    finally:
        methods.clear()
        methods.update(saved)


def test_crafted_history_buffer_cannot_change_class_state(tmp_path):
    path = str(tmp_path / 'crafted.pth')
    _crafted_history_buffer(path)
    before = dict(HistoryBuffer._statistics_methods)
    setstate = HistoryBuffer.__dict__['__setstate__']
    assert before['mean'] is HistoryBuffer.mean
    with pytest.raises(E.UnsafeCheckpointError) as err:
        C.load_checkpoint_file(path)
    assert ('a HistoryBuffer in it sets statistics methods '
            "['evil', 'mean'] that are not mmengine's own (min, max, mean, "
            'current mapped to themselves): this is not allowed') in str(
                err.value)
    assert HistoryBuffer._statistics_methods == before
    assert HistoryBuffer.__dict__['__setstate__'] is setstate

    # The attack is real: the bare allowlist lets the file change it.
    try:
        with torch.serialization.safe_globals(C.allowed_globals()):
            torch.load(path, weights_only=True)
        assert HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.max
    finally:
        HistoryBuffer._statistics_methods.clear()
        HistoryBuffer._statistics_methods.update(before)


def test_runner_history_buffer_loads_without_class_state_change(tmp_path):
    path = str(tmp_path / 'epoch_2.pth')
    torch.save(_runner_like_checkpoint(), path)
    methods = HistoryBuffer._statistics_methods
    methods['probe'] = HistoryBuffer.current  # the process's own state
    try:
        before = dict(methods)
        buf = C.load_checkpoint_file(
            path)['message_hub']['log_scalars']['train/loss']
        assert HistoryBuffer._statistics_methods == before
        assert 'statistics_methods' not in buf.__dict__
        assert buf.statistics('mean') == pytest.approx(0.875 / 3)
        assert buf.statistics('max') == 0.5
    finally:
        methods.pop('probe')


# --------------------------------------------------------------------------
# The torch floor
# --------------------------------------------------------------------------


@pytest.mark.parametrize('version', ['2.5.1', '2.4.0+cpu', '1.13.1'])
def test_old_torch_is_refused_with_one_message(monkeypatch, tmp_path, version):
    path = str(tmp_path / 'w.pth')
    torch.save(WEIGHTS, path)
    monkeypatch.setattr(torch, '__version__', version)
    with pytest.raises(E.UnsupportedTorchError) as err:
        C.load_checkpoint_file(path)
    assert str(err.value) == (
        f'davit_ext loads checkpoints only with torch >= 2.6, found torch '
        f'{version}: older torch can run code from a crafted checkpoint even '
        f'with weights_only=True (CVE-2025-32434). Upgrade torch (pip '
        f'install "torch>=2.6" with its matching torchvision); nothing was '
        f'loaded.')


def test_torch_without_safe_globals_is_not_called_corrupt(
        monkeypatch, tmp_path):
    path = str(tmp_path / 'w.pth')
    torch.save(WEIGHTS, path)
    monkeypatch.delattr(torch.serialization, 'safe_globals')
    with pytest.raises(E.UnsupportedTorchError) as err:
        C.load_checkpoint_file(path)
    assert 'and lacks torch.serialization.safe_globals. Upgrade' in str(
        err.value)
    assert 'truncated' not in str(err.value)


def test_setup_declares_the_torch_floor():
    """setup.py's requirements() (run, not grepped) asks for torch>=2.6."""
    import ast
    setup_py = osp.join(osp.dirname(osp.dirname(__file__)), 'setup.py')
    tree = ast.parse(open(setup_py).read())
    funcs = [
        n for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ('requirements',
                                                         'has_full_mmcv')
    ]
    scope = {'metadata': __import__('importlib').metadata}
    exec(compile(ast.Module(funcs, []), setup_py, 'exec'), scope)
    reqs = scope['requirements']()
    assert 'torch>=2.6' in reqs
    assert [r for r in reqs if r.startswith('torch')][:1] == ['torch>=2.6']


@pytest.mark.parametrize('scheme', ['local', 'open-mmlab:// (file)'])
def test_torch_force_no_weights_only_load_does_not_switch_us_off(
        scheme, monkeypatch, tmp_path):
    """torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 only where weights_only
    is not passed; ours always pass it."""
    from mmengine.runner.checkpoint import CheckpointLoader
    C.install()
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    marker = tmp_path / 'payload_ran'
    evil = _bytes({'state_dict': {}, 'x': _MkdirPayload(str(marker))})
    if scheme == 'local':
        filename = str(tmp_path / 'evil.pth')
        with open(filename, 'wb') as f:
            f.write(evil)
    else:
        _, filename = _scheme_open_mmlab_file(
            evil, monkeypatch=monkeypatch, tmp_path=tmp_path)
    with pytest.raises(E.UnsafeCheckpointError, match='posix.mkdir'):
        CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    assert not marker.exists()
