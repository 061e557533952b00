"""CMP trainer: ITC + IHNM-enhanced ITM + MLM, pose-aware, distributed (torchrun), resumable.

Modules: `config` (YAML + overrides), `data` (dataset, augmentation), `text_aug` (EDA), `masking` (MLM targets),
`losses`, `distributed` (the losses' tensor collectives), `model_setup` (model config, initialisation, gradient
checkpointing), `optim` (parameter groups, LR schedule), `evaluation` (per-epoch metrics through the inference
engine's code), `checkpoints` (format, RNG states), `trainer` (`train(cfg)`). Device, precision and the process
group come from `tpas.runtime`. The CLI is `tpas train cmp --config FILE`.
"""
