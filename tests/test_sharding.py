"""Sharded training of our DaViT: FSDP2 (``fully_shard``) per stage and per
block, FSDP1 with a block auto-wrap policy, on 2 CPU processes over gloo.

Each stage runs its own downsample, so a sharded stage's parameters are
gathered whenever they are used (before, FSDP2 per stage failed with
``aten.native_layer_norm.default got mixed torch.Tensor and DTensor``). Outputs
and gradients must equal those of the unsharded model.
"""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

WORKER = r'''
import json
import sys

import torch
import torch.distributed as dist

from davit_ext.models import DaViT
from davit_ext.models.davit import DaViTBlock


def build():
    torch.manual_seed(0)
    return DaViT(
        arch=dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4]),
        window_size=4, out_indices=(0, 1, 2, 3), drop_path_rate=0.)


def loss_of(outs):
    return sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
               for o in outs)


def main(mode, out_file):
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    ref, model = build(), build()
    if mode.startswith('fsdp2'):
        from torch.distributed.fsdp import fully_shard
        for stage in model.stages:
            if mode == 'fsdp2-stage':
                fully_shard(stage)
            else:
                for block in stage.blocks:
                    fully_shard(block)
        fully_shard(model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({DaViTBlock}),
                     use_orig_params=True, device_id=torch.device('cpu'))
    # The same odd-sized batch on both ranks: the averaged gradient is the
    # unsharded model's gradient.
    x = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(1))
    outs, refs = model(x), ref(x)
    out_diff = max((a - b).abs().max().item() for a, b in zip(outs, refs))
    loss_of(outs).backward()
    loss_of(refs).backward()
    ref_grads = dict(ref.named_parameters())
    grad_diff, n = 0.0, 0
    if mode.startswith('fsdp2'):
        for name, p in model.named_parameters():
            g = p.grad.full_tensor()
            grad_diff = max(grad_diff,
                            (g - ref_grads[name].grad).abs().max().item())
            n += 1
    else:
        with FSDP.summon_full_params(model, with_grads=True):
            for name, p in model.named_parameters():
                name = name.replace('_fsdp_wrapped_module.', '')
                grad_diff = max(grad_diff,
                                (p.grad - ref_grads[name].grad).abs().max()
                                .item())
                n += 1
    scale = max(r.grad.abs().max().item() for r in ref.parameters())
    if rank == 0:
        with open(out_file, 'w') as f:
            json.dump(dict(out_diff=out_diff, grad_diff=grad_diff,
                           grad_scale=scale, params=n,
                           ref_params=len(ref_grads)), f)
    dist.destroy_process_group()


main(sys.argv[1], sys.argv[2])
'''


def _free_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.parametrize('mode', ['fsdp2-stage', 'fsdp2-block', 'fsdp1'])
def test_sharded_forward_and_backward_equal_the_unsharded_model(
        tmp_path, mode):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    out = tmp_path / 'result.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    env.pop('LOCAL_RANK', None)
    proc = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
        '--master_port',
        str(_free_port()),
        str(script), mode,
        str(out)
    ],
                          cwd=str(tmp_path),
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result['params'] == result['ref_params']  # every parameter seen
    assert result['out_diff'] <= 1e-5
    assert result['grad_diff'] <= 1e-5 * max(1.0, result['grad_scale'])
