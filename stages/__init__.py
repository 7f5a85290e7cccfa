"""The CLI layer: one module per DVC stage, each a Typer command that loads its params group,
calls the library and writes the declared outputs.

A command imports the library (and torch) inside its body, after its params are validated: ``adcm
--help`` and a bad key's one-line error then take a fraction of a second instead of the ≈ 8 s that
loading torch, clean-fid and torchvision costs on the 2-core CPU, and each stage loads only what it
uses (tests/stages/test_dvc_deps.py follows these imports when it checks the stages' dependencies)."""
