"""Find the images of a config's datasets that cannot be read, before a run.

    python tools/analysis_tools/check_dataset.py CONFIG
        [--split train val test] [--workers 8] [--cfg-options K=V ...]

Every image of ``train_dataloader.dataset`` (and of the val/test ones) is
read and decoded as the pipeline's ``LoadImageFromFile`` would (same decode
backend and colour type). Each unreadable file is printed on one line (path,
dataset and index, why), then a summary. Exit status 0: all images can be
read; 1: some cannot (remove or replace them, or train with
``tools/train.py --skip-unreadable``); 2: the config or dataset is wrong.
``tools/train.py --check-data`` runs the same check before training.
"""
import os.path as osp
import sys
import warnings

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

warnings.filterwarnings('ignore', message='Fail to import ``MultiScale')
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')


def parse_args(argv=None):
    from davit_ext.cli.args import CfgOptionsAction, ToolArgumentParser
    parser = ToolArgumentParser(
        prog=osp.basename(__file__),
        description='List the images of a dataset that cannot be read')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--split',
        nargs='+',
        choices=['train', 'val', 'test'],
        default=['train', 'val', 'test'],
        help='which dataloaders\' datasets to check (default: all)')
    parser.add_argument(
        '--workers', type=int, default=8, help='reading threads')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        help='override config settings, key=value pairs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from davit_ext.cli import run_tool
    return run_tool(lambda: _check(args))


def _check(args):
    import davit_ext  # noqa: F401
    from davit_ext.cli import checks
    from davit_ext.cli.args import merge_cfg_options
    from davit_ext.cli.config import load_config
    from davit_ext.cli.datacheck import scan_config
    from davit_ext.engine.data import describe_problem

    cfg = load_config(args.config)
    merge_cfg_options(cfg, args.cfg_options, args.config)
    loaders = [f'{s}_dataloader' for s in args.split]
    loaders = [name for name in loaders if cfg.get(name)]
    checks.check_datasets(cfg, loaders)
    seen, checked, problems = set(), 0, []
    for loader in loaders:
        key = repr(cfg[loader].get('dataset'))
        if key in seen:  # test_dataloader = val_dataloader
            continue
        seen.add(key)
        n, found = scan_config(cfg, [loader], workers=args.workers)
        checked += n
        problems += found
    for problem in problems:
        print(f'unreadable: {describe_problem(problem)}')
    print(f'{len(problems)} of {checked} images cannot be read'
          f'{"." if problems else ": all can."}')
    if problems:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
