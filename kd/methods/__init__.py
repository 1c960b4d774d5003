"""The distillation methods. registry.py holds the registry and the settings each method
declares, grid.py the grid of settings a command line asks for (--set); losses.py the logit
losses; base.py the feature methods' contract (Distiller); a file per family registers its
methods when imported, and this package imports every family, so the registry is complete on
`import kd.methods`. plan.py builds a run's distillers from the models' feature points.

The families are imported in the order the registry lists them (and grids train them)."""
from kd.methods import registry, grid  # noqa: F401  (the registry, before any method)
from kd.methods import losses  # noqa: F401  (the logit losses first: ce, kd, dkd, ls, dist)
from kd.methods import hints  # noqa: F401  (fitnet, at, nst, vid, ofd)
from kd.methods import relations  # noqa: F401  (sp, rkd, pkt, kdsvd)
from kd.methods import contrastive  # noqa: F401  (crd, crd_kd)
from kd.methods import reviewkd  # noqa: F401
from kd.methods import plain_kd, plan  # noqa: F401
