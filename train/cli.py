"""The Hydra application: `sparsetron-train [overrides]` or `python -m sparsetron.train [overrides]`."""

import sys
from typing import List, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from sparsetron.configs.schema import register

register()


def compose(overrides: Optional[List[str]] = None, run_dir: Optional[str] = None) -> DictConfig:
    """The composed config without starting the app (tests, notebooks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("sparsetron.configs", version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides or []))
    if run_dir is not None:
        cfg.run_dir = run_dir
    return cfg


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from .trainer import train, user_errors

    OmegaConf.resolve(cfg)
    try:
        summary = train(cfg)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))  # 2: input; 74: a save's I/O failed; 65: non-finite (diverged)
    if summary.get("preempted"):
        from .resilience import REQUEUE_EXIT_CODE

        sys.exit(REQUEUE_EXIT_CODE)  # the checkpoint is written; launch/slurm.sbatch requeues on this code


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
