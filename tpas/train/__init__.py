"""CMP and X-VLM trainer: ITC + IHNM-enhanced ITM + MLM, pose-aware (CMP) or in-batch ITC + ITM (X-VLM), distributed
(torchrun), resumable.

Modules: `config` (YAML + overrides, each kind's defaults), `kinds` (what CMP and X-VLM do differently), `data`
(dataset, augmentation, subset lists), `text_aug` (EDA), `masking` (MLM targets), `losses`, `distributed` (the
losses' tensor collectives), `model_setup` (model config, initialisation, gradient checkpointing), `optim` (parameter
groups, LR schedule), `evaluation` (per-epoch metrics through the inference engine's code), `checkpoints` (format, RNG
states), `trainer` (`train(cfg, kind=...)`). Device, precision and the process group come from `tpas.runtime`. The
CLI is `tpas train cmp|xvlm --config FILE`.
"""
