"""Train a latent diffusion model: `python train.py [experiment=NAME] [overrides]` (see ldm/cli/train.py)."""

from ldm.cli.train import main

if __name__ == "__main__":
    main()
