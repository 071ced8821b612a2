"""Build each config of configs/davit/metafile.yml and compare its parameter
count and FLOPs with the published numbers.

    python tools/analysis_tools/check_published.py [--models NAME ...]
        [--no-flops]
    python tools/analysis_tools/check_published.py --florence2

Parameters must match exactly; FLOPs (mmengine's counter, one 224x224
image; 768x768 for the Florence-2 towers) within 1 %. Exits with status 1 if
a model does not match. ``--florence2`` prints the parameters and FLOPs of
the Florence-2 towers (backbones without a head) at 256x256 with window 8 and
at 768x768 with window 12.
"""
import argparse
import logging
import os.path as osp
import sys
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
FLOPS_TOLERANCE = 0.01


def published_models(names=None):
    import yaml
    with open(osp.join(ROOT, 'configs', 'davit', 'metafile.yml')) as f:
        models = yaml.safe_load(f)['Models']
    models = [m for m in models if names is None or m['Name'] in names]
    if names:
        unknown = set(names) - {m['Name'] for m in models}
        if unknown:
            raise SystemExit(f'error: unknown model(s) {sorted(unknown)}; '
                             f'see configs/davit/metafile.yml for names.')
    return models


def build(config_path, backbone=None):
    """Build a config's model in eval mode; ``backbone`` overrides keys of its
    backbone."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import davit_ext  # noqa: F401
    cfg = Config.fromfile(config_path)
    cfg.model.backbone.update(backbone or {})
    init_default_scope(cfg.get('default_scope', 'davit_ext'))
    model = MODELS.build(cfg.model)
    model.eval()
    return model


def count(model, flops=True, size=224):
    params = sum(p.numel() for p in model.parameters())
    if not flops:
        return params, None
    import torch
    from mmengine.analysis import get_model_complexity_info
    with torch.no_grad():
        info = get_model_complexity_info(
            model,
            input_shape=(3, size, size),
            show_table=False,
            show_arch=False)
    return params, int(info['flops'])


def input_size(name):
    """The metafile's FLOPs are at 768x768 for the Florence-2 towers (their
    resolution), at 224x224 for the others."""
    return 768 if 'florence2-pre' in name else 224


# (arch, config, input size, window) rows of --florence2.
FLORENCE2_ROWS = [
    (arch, f'configs/davit/davit-{arch}_florence2-pre_headless.py', size,
     window) for arch in ('base-fl', 'huge-fl')
    for size, window in ((256, 8), (768, 12))
]


def florence2_table():
    """Print parameters and FLOPs of the Florence-2 towers."""
    header = (f'{"arch":<8} {"input":>9} {"window":>6} {"params":>12} '
              f'{"GFLOPs":>9}')
    print(header)
    print('-' * len(header))
    for arch, config, size, window in FLORENCE2_ROWS:
        model = build(osp.join(ROOT, config), dict(window_size=window))
        params, flops = count(model, True, size)
        print(
            f'{arch:<8} {f"{size}x{size}":>9} {window:>6} {params:>12,} '
            f'{flops / 1e9:>9.2f}',
            flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', help='metafile model names')
    parser.add_argument('--no-flops', action='store_true')
    parser.add_argument(
        '--florence2',
        action='store_true',
        help='print parameters and FLOPs of the Florence-2 towers at 256x256 '
        '(window 8) and 768x768 (window 12) and exit')
    parser.add_argument(
        '--all',
        action='store_true',
        help='include entries whose config shares the weights of one '
        'already listed (the -official variants) and the Florence-2 towers')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')
    from mmengine.logging import MMLogger

    # The FLOP counter warns about every op it does not count (additions,
    # norms, softmax... are not counted by convention).
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    if args.florence2:
        return florence2_table()

    models = published_models(args.models)
    if not args.all and not args.models:
        # The -official entries repeat their weights' numbers; the
        # Florence-2 towers take minutes at 768x768 (--models NAME checks
        # them, --florence2 prints both sizes).
        models = [
            m for m in models if not m['Name'].endswith('-official')
            and 'florence2' not in m['Name']
        ]
    header = (f'{"model":<38} {"params":>12} {"published":>12} '
              f'{"GFLOPs":>8} {"published":>9} {"diff":>7}  status')
    print(header)
    print('-' * len(header))
    ok = True
    for meta in models:
        config = osp.join(ROOT, meta['Config'])
        if not osp.isfile(config):
            print(f'{meta["Name"]:<38} config {meta["Config"]} not found')
            ok = False
            continue
        start = time.time()
        params, flops = count(
            build(config), not args.no_flops, input_size(meta['Name']))
        pub_params = meta['Metadata']['Parameters']
        pub_flops = meta['Metadata']['FLOPs']
        good = params == pub_params
        flops_txt, diff_txt = '-', '-'
        if flops is not None:
            diff = flops / pub_flops - 1
            good = good and abs(diff) <= FLOPS_TOLERANCE
            flops_txt, diff_txt = f'{flops / 1e9:.3f}', f'{diff:+.2%}'
        ok = ok and good
        print(
            f'{meta["Name"]:<38} {params:>12,} {pub_params:>12,} '
            f'{flops_txt:>8} {pub_flops / 1e9:>9.3f} {diff_txt:>7}  '
            f'{"OK" if good else "MISMATCH"} ({time.time() - start:.1f} s)',
            flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
