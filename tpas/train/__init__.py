"""CMP trainer: ITC + IHNM-enhanced ITM + MLM, pose-aware, distributed (torchrun), resumable.

Modules: `config` (YAML + overrides), `data` (dataset, augmentation), `text_aug` (EDA), `masking` (MLM targets),
`losses`, `distributed` (DDP helpers), `trainer` (`train(cfg)`). The CLI is `tpas train cmp --config FILE`.
"""
