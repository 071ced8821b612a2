"""Parameters and FLOPs of a detection or segmentation config, without data.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H W]
    python tools/analysis_tools/get_flops.py --paper [--models NAME ...]

mmdet's and mmseg's own get_flops.py read an image from the config's dataset
(COCO, ADE20K); this one feeds a random image of ``--shape`` (default: 800
1280 for detectors, 512 2048 for segmentors, the sizes the DaViT and Swin
papers count at), so it runs where the datasets are not. FLOPs are
mmengine's count (one multiply-add = one FLOP) of ``forward(mode='tensor')``:
backbone, neck and heads; for two-stage detectors the RoI heads on the RPN's
proposals. ``--paper`` prints the paper's nine models next to the official
table (github.com/dingmyu/davit).
"""
import argparse
import logging
import os.path as osp
import sys
import warnings

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

# Official DaViT README: (config, params in M, GFLOPs), T/S/B.
PAPER = [(f'configs/{task}/{name.format(a)}', params, flops)
         for task, name, table in (
             ('det', 'mask-rcnn_davit-{}_fpn_ms-crop-1x_coco.py',
              ((47.8, 263), (69.2, 351), (107.3, 491))),
             ('det', 'retinanet_davit-{}_fpn_ms-crop-1x_coco.py',
              ((38.5, 244), (59.9, 332), (98.5, 471))),
             ('seg', 'upernet_davit-{}_8xb2-160k_ade20k-512x512.py',
              ((60, 940), (81, 1030), (121, 1175))),
         ) for a, (params, flops) in zip('tsb', table)]


def build(config):
    """The config's model in eval mode, without its pretrained weights (the
    counts do not depend on them; nothing is downloaded)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import davit_ext  # noqa: F401
    cfg = Config.fromfile(config)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise SystemExit(f'error: {config} is a {scope!r} config; this tool '
                         'counts mmdet and mmseg models (classification: '
                         'tools/analysis_tools/check_published.py)')
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    backbone = cfg.model.get('backbone', {})
    if backbone.get('init_cfg'):
        backbone['init_cfg'] = None
    model = MODELS.build(cfg.model)
    model.eval()
    return model, scope


def count(model, scope, shape):
    """(parameters, FLOPs) for one ``shape`` (H, W) image."""
    import torch
    from mmengine.analysis import get_model_complexity_info
    h, w = shape
    meta = dict(
        img_shape=(h, w),
        ori_shape=(h, w),
        pad_shape=(h, w),
        batch_input_shape=(h, w),
        scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    inputs = torch.randn(
        1, 3, h, w, generator=torch.Generator().manual_seed(0))
    samples = [Sample(metainfo=meta)]

    class Tensor(torch.nn.Module):
        """The model's ``forward(inputs, samples, mode='tensor')``."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, samples, mode='tensor')

    with torch.no_grad():
        info = get_model_complexity_info(
            Tensor(), inputs=(inputs, ), show_table=False, show_arch=False)
    return sum(p.numel() for p in model.parameters()), int(info['flops'])


def default_shape(scope):
    return (800, 1280) if scope == 'mmdet' else (512, 2048)


def paper_table(names=None):
    rows = [r for r in PAPER if not names or osp.basename(r[0]) in names]
    header = (f'{"config":<48} {"params":>8} {"official":>8} '
              f'{"GFLOPs":>7} {"official":>8} {"diff":>7}')
    print(header)
    print('-' * len(header))
    for config, params_m, gflops in rows:
        model, scope = build(osp.join(ROOT, config))
        params, flops = count(model, scope, default_shape(scope))
        print(
            f'{osp.basename(config)[:-3]:<48} {params / 1e6:>7.2f}M '
            f'{params_m:>7}M {flops / 1e9:>7.1f} {gflops:>8} '
            f'{(flops / 1e9 - gflops) / gflops:>+7.1%}',
            flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input size (default 800 1280 for detectors, 512 2048 for '
        'segmentors)')
    parser.add_argument(
        '--paper',
        action='store_true',
        help="the paper's nine configs next to the official table")
    parser.add_argument(
        '--models', nargs='+', help='with --paper: these config file names')
    args = parser.parse_args(argv)
    if bool(args.config) == args.paper:
        parser.error('give a CONFIG or --paper (not both)')
    warnings.filterwarnings('ignore')
    from mmengine.logging import MMLogger

    # The FLOP counter warns about every op it does not count (additions,
    # norms, softmax, NMS... are not counted by convention).
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    if args.paper:
        return paper_table(args.models)
    if not osp.isfile(args.config):
        raise SystemExit(f'error: no config file {args.config}')
    model, scope = build(args.config)
    shape = tuple(args.shape or default_shape(scope))
    params, flops = count(model, scope, shape)
    print(f'input {shape[0]}x{shape[1]}  params {params / 1e6:.2f} M  '
          f'FLOPs {flops / 1e9:.1f} G')
    return 0


if __name__ == '__main__':
    sys.exit(main())
