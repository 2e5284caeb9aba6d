"""Train a latent diffusion model: `python train.py [experiment=NAME] [overrides]` (see ldm/cli/train.py)."""

import sys

try:
    from ldm.cli.train import main
except KeyboardInterrupt:  # Ctrl-C in the first moments, before train.py's own handlers are in place
    print("\ntrain.py: SIGINT while starting (before the first step): stopped (nothing to save yet)", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
