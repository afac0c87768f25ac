# Model spec fragments shared by the benchmark scripts (sourced, not run): `benchmarks/quality.py --models` takes
# `label=name[:preset][|key=value...]`; these are the overrides that put the baselines on one small U-Net scale.
# shellcheck disable=SC2034  # used by the scripts that source this file
small='model.args.backbone=unet|model.args.backbone_cfg={widths: [16, 32, 64, 128]}'
phiseg='model.args.backbone_cfg={widths: [16, 32, 64, 128, 128]}|model.args.latent_levels=3'
