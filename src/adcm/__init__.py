"""adcm: consistency models with adaptive discretization (ADCM), ECT, iCT and sCM.

The library never reads ``params.yaml`` or argv; the CLI layer in ``stages/`` does that and
passes typed config objects and paths in.
"""

__version__ = "0.1.0"
