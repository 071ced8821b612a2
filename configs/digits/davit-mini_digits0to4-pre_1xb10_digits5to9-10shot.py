# Transfer demo, step 2: fine-tune the backbone pretrained on the digits 0-4
# (davit-mini_1xb64_digits0to4.py) on the digits 5-9 with 10 labelled images
# per class; a new 5-class head. Everything else (data, schedule, layer-wise
# lr decay) is the from-scratch baseline davit-mini_1xb10_digits5to9-10shot.py:
# the two runs differ only by the backbone's initial weights.
#
# The backbone comes from the pretraining run's checkpoint (mmpretrain's
# init_cfg route; tools/run_transfer_demo.py passes the path):
#   python tools/train.py THIS_CONFIG --cfg-options \
#       model.backbone.init_cfg.checkpoint=work_dirs/.../epoch_10.pth
_base_ = ['./davit-mini_1xb10_digits5to9-10shot.py']

model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint='work_dirs/davit-mini_1xb64_digits0to4/epoch_10.pth',
            prefix='backbone')))
