"""Sample images from any Stable Diffusion checkpoint: `python sample.py ckpt=PATH prompt="..."`."""

from ldm.cli.sample import main

if __name__ == "__main__":
    main()
