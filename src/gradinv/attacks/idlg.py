"""improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen 2020).

The label of a single sample is read from the signs of the classifier's gradient (cross-entropy makes the
true class's factor the only negative one), then the input alone is optimised with DLG's L-BFGS and
Euclidean distance. Threat model as DLG; labels from the threat model take precedence.
"""

from __future__ import annotations

from torch import Tensor

from gradinv.attacks.base import register_attack
from gradinv.attacks.dlg import _LBFGSAttack
from gradinv.attacks.labels import labels_for
from gradinv.types import Observation


@register_attack
class IDLG(_LBFGSAttack):
    name = "idlg"
    summary = "iDLG (Zhao et al. 2020): label from the last layer's gradient signs, then L-BFGS on the data"
    table1 = {
        "initialisation": "Gaussian",
        "objective": "Euclidean distance",
        "optimiser": "L-BFGS",
        "priors": "none (label read from the last layer's gradient)",
    }

    def _labels(self, observation: Observation) -> tuple[Tensor | None, str]:
        return labels_for(observation, method=self.settings.label_method)
