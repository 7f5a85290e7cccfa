"""``python -m adcm`` (and ``torchrun -m adcm``) runs the same CLI as the ``adcm`` script."""

from adcm.stages.cli import main

if __name__ == "__main__":
    main()
