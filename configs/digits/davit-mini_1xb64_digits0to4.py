# Transfer demo, step 1 (tools/run_transfer_demo.sh): the digits demo's mini
# DaViT pretrained on the digits 0-4 only (723 images; five classes), with
# random resized crops: without them the late stages' features collapse onto
# the five classes and transfer worse than random weights (README, "Fine-tune
# on your own data").
#
# Data: tools/run_transfer_demo.py writes the annotation files
# data/digits/transfer/digits0to4_{train,val}.txt (CustomDataset "path label"
# lines) over the export of tools/dataset_converters/digits_to_folder.py.
_base_ = ['./davit-mini_1xb64_digits32.py']

classes = ['0', '1', '2', '3', '4']
model = dict(head=dict(num_classes=len(classes)))
data_preprocessor = dict(num_classes=len(classes))

train_dataloader = dict(
    dataset=dict(
        ann_file='transfer/digits0to4_train.txt',
        data_prefix='train',
        classes=classes,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='RandomResizedCrop',
                scale=32,
                crop_ratio_range=(0.5, 1.0)),
            dict(type='PackInputs'),
        ]))
val_dataloader = dict(
    dataset=dict(
        ann_file='transfer/digits0to4_val.txt',
        data_prefix='val',
        classes=classes))
test_dataloader = val_dataloader
