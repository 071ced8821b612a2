"""``import davit_ext``'s process-wide changes and the ways to opt out."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = '''
    import json
    import davit_ext
    from mmengine.analysis import complexity_analysis
    from mmengine.runner.checkpoint import CheckpointLoader
    from mmpretrain import get_model, list_models
    loaders = sorted(
        {f.__module__ for f in CheckpointLoader._schemes.values()})
    tiny = get_model('davit-tiny_3rdparty_in1k').backbone
    print(json.dumps(dict(
        loaders=loaders,
        tiny=type(tiny).__module__,
        names=list_models('davit'),
        sdpa='aten::scaled_dot_product_attention' in
        complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS)))
'''
OURS = [
    f'davit-{a}_3rdparty_in1k-official' for a in ('base', 'small', 'tiny')
] + [f'davit-{a}-fl_florence2-pre_3rdparty' for a in ('base', 'huge')]
MMPRETRAINS = [f'davit-{a}_3rdparty_in1k' for a in ('base', 'small', 'tiny')]


def probe(disable):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('DAVIT_EXT_DISABLE', None)
    if disable is not None:
        env['DAVIT_EXT_DISABLE'] = disable
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(PROBE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300)
    return proc


@pytest.mark.parametrize('disable', [None, 'all', 'names', 'checkpoint,flops'])
def test_each_side_effect_and_its_opt_out(disable):
    proc = probe(disable)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    off = {
        None: set(),
        'all': {'checkpoint', 'hub', 'names', 'flops'},
        'names': {'names'},
        'checkpoint,flops': {'checkpoint', 'flops'}
    }[disable]
    assert out['loaders'] == (
        ['mmengine.runner.checkpoint'] if 'checkpoint' in off else
        ['davit_ext.weights.florence2', 'davit_ext.weights.schemes'])
    assert out['sdpa'] is ('flops' not in off)
    if 'hub' in off:
        assert out['names'] == sorted(MMPRETRAINS)
        assert out['tiny'] == 'mmpretrain.models.backbones.davit'
    elif 'names' in off:  # ours added, mmpretrain's names left alone
        assert out['names'] == sorted(MMPRETRAINS + OURS)
        assert out['tiny'] == 'mmpretrain.models.backbones.davit'
    else:
        assert out['names'] == sorted(MMPRETRAINS + OURS)
        assert out['tiny'] == 'davit_ext.models.davit'


def test_unknown_opt_out_is_one_clear_error():
    proc = probe('hubb')
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ValueError: DAVIT_EXT_DISABLE='hubb' names hubb, which davit_ext "
        'does not know: use a comma-separated list of checkpoint, hub, '
        'names, flops, or all.')


def test_uninstall_functions_undo_in_process():
    from mmengine.analysis import complexity_analysis
    from mmengine.runner import checkpoint as mm
    from mmpretrain import get_model, list_models

    from davit_ext import analysis, hub
    from davit_ext import weights as checkpoint
    table = complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS
    try:
        checkpoint.uninstall()
        hub.uninstall()
        analysis.unregister_flop_handles()
        assert mm.CheckpointLoader._schemes[''] is mm.load_from_local
        assert list_models('davit') == sorted(MMPRETRAINS)
        model = get_model('davit-tiny_3rdparty_in1k')
        assert type(model.backbone).__module__ == \
            'mmpretrain.models.backbones.davit'
        assert analysis.SDPA_OP not in table
    finally:
        checkpoint.install()
        hub.install()
        analysis.register_flop_handles()
    assert checkpoint.is_installed()
    assert list_models('davit') == sorted(MMPRETRAINS + OURS)
    assert type(get_model('davit-tiny_3rdparty_in1k').backbone).__module__ \
        == 'davit_ext.models.davit'
    assert table[analysis.SDPA_OP] is analysis.sdpa_flop_jit
